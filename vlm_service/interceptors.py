"""The one place where errors become gRPC status codes.

Domain errors map to their codes with rich details (``google.rpc.BadRequest`` field violations,
``google.rpc.RetryInfo``) through grpcio-status. Anything else is a bug: it is logged with a request id
and the client gets INTERNAL with an opaque message, never a traceback.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_interceptor.exception_to_status import AsyncExceptionToStatusInterceptor
from grpc_interceptor.exceptions import GrpcException
from grpc_status import rpc_status

from .errors import (
    GenerationFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
)

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    GenerationFailed: grpc.StatusCode.INTERNAL,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: ServiceError) -> grpc.Status:
    """A ServiceError as a gRPC status with rich details."""
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
    if isinstance(error, QueueFull):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=packed)
    return rpc_status.to_status(proto)


class ErrorInterceptor(AsyncExceptionToStatusInterceptor):
    """Maps exceptions raised by handlers (also mid-stream) to statuses."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, ServiceError):
            status = to_status(ex)
            if status.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                logger.warning("%s: %s", method_name, ex.message)
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(ex, GrpcException):
            await context.abort(ex.status_code, ex.details)
        error_id = uuid.uuid4().hex[:16]
        logger.error("%s failed (error id %s)", method_name, error_id, exc_info=ex)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error; see the server log for error id {error_id}")
