"""Client-side errors: one exception type per gRPC status the service uses."""

from __future__ import annotations

import grpc


class VLMError(Exception):
    """An RPC failed. ``code`` is the gRPC status code, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        if code is not None:
            self.code = code
        self.request_id = request_id


class InvalidArgument(VLMError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(VLMError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(VLMError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(VLMError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(VLMError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(VLMError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(VLMError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, ModelNotFound, Overloaded, Unavailable, DeadlineExceeded, Cancelled, Unauthenticated)
}


def from_rpc_error(error: grpc.RpcError, request_id: str | None = None) -> VLMError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, VLMError)
    return cls(details, code=code, request_id=request_id)
