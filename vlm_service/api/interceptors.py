"""The server's interceptors, in the order a call meets them (server.py builds the chain):
tracing (when on), :class:`AccessLogInterceptor` (request id, access line), :class:`BearerTokenInterceptor`
(with ``--auth-token``), :class:`ErrorInterceptor` (exceptions become statuses, through the table in
:mod:`vlm_service.api.status`) and :class:`MalformedRequestInterceptor` (request bytes that are not a
valid message get INVALID_ARGUMENT). Each wraps a handler in one of the same shape (:func:`rebuild_handler`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import grpc
from grpc_health.v1 import health
from grpc_interceptor.exception_to_status import AsyncExceptionToStatusInterceptor
from grpc_interceptor.exceptions import GrpcException
from grpc_reflection.v1alpha import reflection

from vlm_service.api.status import to_status
from vlm_service.errors import MalformedMessage, ServiceError
from vlm_service.observability import access

logger = logging.getLogger(__name__)

_REFLECTION_PREFIXES = (f"/{reflection.SERVICE_NAME}/", "/grpc.reflection.v1.ServerReflection/")
_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


class ErrorInterceptor(AsyncExceptionToStatusInterceptor):
    """Maps exceptions raised by handlers (also mid-stream) to statuses."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, grpc.aio.AbortError):
            # The handler chose its status itself (the health service's NOT_FOUND for an unknown name).
            raise ex
        request_id = access.request_id()
        trailers = ((access.REQUEST_ID_KEY, request_id),)
        if isinstance(ex, ServiceError):
            status = to_status(ex)
            if status.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                logger.warning("%s: %s", method_name, ex.message)
            await context.abort(status.code, status.details, tuple(status.trailing_metadata) + trailers)
        if isinstance(ex, GrpcException):
            await context.abort(ex.status_code, ex.details, trailers)
        logger.error("%s failed (request id %s)", method_name, request_id, exc_info=ex)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error; see the server log for request id {request_id}", trailers
        )


class _Malformed:
    """Stands in for a request whose bytes did not parse."""


def _safe(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:
            return _Malformed()

    return deserialize


async def _checked_messages(messages):
    """A request stream whose malformed messages raise MalformedMessage where they come (the handler maps
    it to INVALID_ARGUMENT like any of its errors)."""
    index = 0
    async for message in messages:
        index += 1
        if isinstance(message, _Malformed):
            raise MalformedMessage(f"message {index} of the request stream is not a valid message")
        yield message


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Requests whose bytes are not a valid message get INVALID_ARGUMENT, not gRPC's UNKNOWN (or, in a
    request stream, INTERNAL) with the parser's exception in it. Deserialization happens before any
    handler runs (for a request stream, as the handler reads each message), so this wraps it."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not handler.response_streaming:  # no such RPC in this service
            return handler

        def checked(behaviour, response_streaming: bool):
            if handler.request_streaming:
                return lambda request_iterator, context: behaviour(_checked_messages(request_iterator), context)
            if response_streaming:

                async def stream(request, context):
                    if isinstance(request, _Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message")
                    async for response in _responses(behaviour(request, context)):
                        yield response

                return stream

            async def unary(request, context):
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message")
                return await behaviour(request, context)

            return unary

        return rebuild_handler(handler, checked, request_deserializer=_safe(handler.request_deserializer))


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Request ids for every RPC but health checks, and (``log``) one access line per RPC at INFO
    (:mod:`vlm_service.observability.access`)."""

    def __init__(self, log: bool = True):
        self._log = log

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(access.REQUEST_ID_KEY)
        log = self._log

        def wrap(behaviour, response_streaming: bool):
            if response_streaming:

                async def stream(request_or_iterator, context):
                    with access.recorded_call(method, sent, context, log) as call:
                        # A stream that grpc cancels while it writes a message stays suspended at its
                        # ``yield`` until it is collected: its line is written when the RPC ends, here
                        # (a handler that ended by itself has written it already).
                        context.add_done_callback(
                            lambda _: access.end_call(call, context, asyncio.CancelledError(), log)
                        )
                        async for response in _responses(behaviour(request_or_iterator, context)):
                            yield response

                return stream

            async def unary(request_or_iterator, context):
                with access.recorded_call(method, sent, context, log):
                    return await behaviour(request_or_iterator, context)

            return unary

        return rebuild_handler(handler, wrap)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token authentication, checked before any handler runs and before the request is parsed.

    A client sends ``authorization: Bearer TOKEN`` metadata. The token is compared in constant time.
    Health checks are always open (orchestrators probe without credentials); whether reflection needs
    the token is a setting. A missing or wrong token is UNAUTHENTICATED, and the message never echoes it.
    """

    def __init__(self, token: str, reflection_requires_auth: bool = True):
        self._expected = f"Bearer {token}".encode()
        self._reflection_requires_auth = reflection_requires_auth

    def _open(self, method: str) -> bool:
        if method.startswith(_HEALTH_PREFIX):
            return True
        return not self._reflection_requires_auth and method.startswith(_REFLECTION_PREFIXES)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._open(handler_call_details.method):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if not sent:
            return _deny(handler, "missing credentials: send 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(sent.encode(), self._expected):
            return _deny(handler, "invalid credentials")
        return handler


def _unparsed(data: bytes) -> None:
    """Stands in for the request's deserializer in a denied call: nothing is parsed."""
    return None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED; the request's bytes
    are never parsed for a caller that is not authenticated."""

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return rebuild_handler(
        handler,
        lambda _, response_streaming: abort_stream if response_streaming else abort,
        request_deserializer=_unparsed,
    )


def rebuild_handler(handler: grpc.RpcMethodHandler, wrap, *, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` (the same request and response streaming), whose
    behaviour is ``wrap(behaviour, response_streaming)`` of the original's; ``request_deserializer``
    replaces the original's when given."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kwargs)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kwargs)


async def _responses(result):
    """A streaming handler's responses, whether it yields them or writes them with context.write."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result
