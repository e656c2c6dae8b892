"""Each RPC's identity and its access-log line.

The access interceptor (:class:`~vlm_service.api.interceptors.AccessLogInterceptor`) opens a
:class:`Call` for every RPC but health checks (:func:`recorded_call`): a request id (the caller's
``x-request-id`` when it is a sane one, else a new one), made the current call (a context variable, so
the handler, the error interceptor and every log record of the call see the same id; the servicer
echoes it in the initial metadata, error statuses in their trailers). When the call ends
(:func:`end_call`) one access line is written: method, model, final status, request id, prompt and
completion tokens, time to first text, total time and peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

REQUEST_ID_KEY = "x-request-id"
#: An incoming request id is used only if it is short and plain (it goes into logs and messages).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

logger = logging.getLogger("vlm_service.access")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def valid_request_id(value: str | bytes | None) -> str | None:
    """``value`` if it can serve as a request id (1-128 of ``A-Za-z0-9._:-``), else None."""
    if isinstance(value, bytes):
        return None  # a binary (-bin) header is never an id
    return value if value and _REQUEST_ID.fullmatch(value) else None


@dataclass
class Call:
    """What the access line reports about one RPC; the handler fills in what only it knows."""

    method: str  # the full method name, /package.Service/Method
    request_id: str
    peer: str
    started: float  # time.monotonic()
    model: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_text_at: float | None = None  # time.monotonic() of the first text sent
    logged: bool = False  # its access line is written (once, however the RPC ends)

    def fields(self, code: str, ended: float) -> dict:
        def ms(at: float | None) -> float | None:
            return None if at is None else round((at - self.started) * 1000, 3)

        return {
            "method": self.method,
            "model": self.model or None,
            "code": code,
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_text_ms": ms(self.first_text_at),
            "total_ms": ms(ended),
            "peer": self.peer,
        }


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("vlm_call", default=None)


def current_call() -> Call | None:
    """The RPC being handled in this task, if any."""
    return _current.get()


def request_id() -> str:
    """The current RPC's request id, or a new one outside an RPC."""
    call = _current.get()
    return call.request_id if call is not None else new_request_id()


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with, from how its handler ended."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code)


@contextlib.contextmanager
def recorded_call(
    method: str, sent_id: str | bytes | None, context: grpc.aio.ServicerContext, log: bool
) -> Iterator[Call]:
    """An RPC's :class:`Call` for the length of its handler: the caller's request id when it is a sane
    one (else a new one), made the current call, and the access line written (:func:`end_call`) when
    the handler ends, however it ends. No trailing metadata is set here: a stream with trailers set in
    advance is not cancelled at its deadline by grpc.aio (its generation ran on). Errors carry the id
    (ErrorInterceptor)."""
    call = Call(method, valid_request_id(sent_id) or new_request_id(), context.peer(), time.monotonic())
    token = _current.set(call)
    error = None
    try:
        yield call
    except BaseException as exc:
        error = exc
        raise
    finally:
        with contextlib.suppress(ValueError):  # a generator closed from another context
            _current.reset(token)
        end_call(call, context, error, log)


def end_call(call: Call, context: grpc.aio.ServicerContext, error: BaseException | None, log: bool) -> None:
    """Write the RPC's access line (when ``log``), once however the RPC ends."""
    if call.logged:
        return
    call.logged = True
    if log:
        code = final_code(context, error).name
        fields = call.fields(code, time.monotonic())
        text = " ".join(
            f"{key}={value}" for key, value in fields.items() if key not in ("method", "code") and value is not None
        )
        logger.info("%s %s %s", call.method, code, text, extra=fields)
