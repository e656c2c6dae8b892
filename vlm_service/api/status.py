"""The one place where errors become gRPC status codes.

Domain errors map to their codes with rich details (``google.rpc.BadRequest`` field violations,
``google.rpc.RetryInfo``) through grpcio-status. Anything else is a bug: it is logged with the call's
request id and the client gets INTERNAL with an opaque message naming that id, never a traceback.
Every error status carries the request id in its trailing metadata (``x-request-id``).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from vlm_service.errors import (
    DeadlineExpired,
    DeadlineUnmeetable,
    GenerationFailed,
    GenerationStalled,
    InvalidInput,
    MalformedMessage,
    ModelNotFound,
    ModelNotReady,
    NotSupported,
    OutOfMemory,
    QueueFull,
    ReaderStalled,
    ServiceError,
    ShuttingDown,
)

logger = logging.getLogger(__name__)

#: The trailer gRPC clients' retry policies read as the server's retry delay (gRFC A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedMessage: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    NotSupported: grpc.StatusCode.FAILED_PRECONDITION,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    GenerationFailed: grpc.StatusCode.INTERNAL,
    DeadlineUnmeetable: grpc.StatusCode.DEADLINE_EXCEEDED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    GenerationStalled: grpc.StatusCode.ABORTED,
    ReaderStalled: grpc.StatusCode.ABORTED,
    OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: Codes sent from outside the table above (the transport, the auth interceptor, the RPC's own end),
#: each with where it comes from. With STATUS_CODES this is every code a client can get; the proto's
#: service comment and the status table of docs/guarantees.md are tested against both.
OTHER_STATUS_CODES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "request bytes that are not a valid message (MalformedRequestInterceptor)",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a message above the transport limit; --max-streams; image decodes busy",
    grpc.StatusCode.UNAUTHENTICATED: "a missing or wrong bearer token (interceptors.BearerTokenInterceptor)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the RPC's deadline passed",
    grpc.StatusCode.CANCELLED: "the client cancelled",
    grpc.StatusCode.INTERNAL: "an unexpected exception (ErrorInterceptor, with an error id)",
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: ServiceError) -> grpc.Status:
    """A ServiceError as a gRPC status with rich details."""
    status = rpc_status.to_status(to_rpc_status(error))
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        # The same hint for gRPC's own retries: a client's retry policy waits exactly this long before
        # its next attempt (for the codes it retries) instead of its jittered backoff.
        pushback = (RETRY_PUSHBACK_KEY, str(int(retry_after * 1000)))
        status = status._replace(trailing_metadata=(*status.trailing_metadata, pushback))
    return status


def to_rpc_status(error: ServiceError) -> status_pb2.Status:
    """A ServiceError as a ``google.rpc.Status`` message, with its rich details (``BadRequest``,
    ``RetryInfo``): what a status's trailers carry, and what a Watch frame's error message carries."""
    code = status_code(error)
    details = []
    if isinstance(error, InvalidInput):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        details.append(bad_request)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=packed)
