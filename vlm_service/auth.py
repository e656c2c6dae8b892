"""Bearer-token authentication, checked before any handler runs and before the request is parsed.

A client sends ``authorization: Bearer TOKEN`` metadata. The token is compared in constant time.
Health checks are always open (orchestrators probe without credentials); whether reflection needs
the token is a setting. A missing or wrong token is UNAUTHENTICATED, and the message never echoes it.
"""

from __future__ import annotations

import hmac

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

_REFLECTION_PREFIXES = (f"/{reflection.SERVICE_NAME}/", "/grpc.reflection.v1.ServerReflection/")
_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


def _unparsed(data: bytes) -> None:
    """Stands in for the request's deserializer in a denied call: nothing is parsed."""
    return None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    # The request's bytes are never parsed for a caller that is not authenticated.
    kwargs = {"request_deserializer": _unparsed, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
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
