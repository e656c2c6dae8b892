"""Client-side errors: one exception type per gRPC status the service uses, with the rich details
(``google.rpc.RetryInfo``, ``google.rpc.BadRequest``) the server sends beside the status."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One field the server refused (from ``google.rpc.BadRequest``): ``field`` is its path in the
    request, e.g. ``options.top_p``."""

    field: str
    description: str


class VLMError(Exception):
    """An RPC failed. ``code`` is the gRPC status code, ``details`` the server's message,
    ``retry_after`` the server's hint in seconds before retrying (``google.rpc.RetryInfo``, else None),
    ``field_violations`` the refused fields (``google.rpc.BadRequest``), ``request_id`` the server's
    request id when the stream had received it."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        *,
        retry_after: float | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ):
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.field_violations = field_violations


class InvalidArgument(VLMError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(VLMError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(VLMError):
    """The model cannot do what was asked (Detect or Point on a model that does not ground)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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


class Aborted(VLMError):
    code = grpc.StatusCode.ABORTED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ModelNotFound,
        FailedPrecondition,
        Overloaded,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        Aborted,
    )
}


def _rich_details(error: grpc.RpcError) -> tuple[float | None, tuple[FieldViolation, ...]]:
    """RetryInfo and BadRequest from the status details in the trailers, if the server sent any."""
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):  # not a call (no trailers), or trailers that disagree with the status
        return None, ()
    return _unpack(status.details if status is not None else ())


def _unpack(details) -> tuple[float | None, tuple[FieldViolation, ...]]:
    retry_after, violations = None, []
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return retry_after, tuple(violations)


def from_rpc_error(error: grpc.RpcError, request_id: str | None = None) -> VLMError:
    """The VLMError for a failed call (sync or asyncio), with the server's rich details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    retry_after, violations = _rich_details(error)
    cls = _BY_CODE.get(code, VLMError)
    return cls(details, code=code, request_id=request_id, retry_after=retry_after, field_violations=violations)


def from_status(status: status_pb2.Status, request_id: str | None = None) -> VLMError:
    """The VLMError for a ``google.rpc.Status`` message (a Watch frame's error), with its rich details."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    retry_after, violations = _unpack(status.details)
    cls = _BY_CODE.get(code, VLMError)
    return cls(status.message, code=code, request_id=request_id, retry_after=retry_after, field_violations=violations)
