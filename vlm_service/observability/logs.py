"""Logging set-up: text lines for people, or one JSON object a line (``--log-format json``, through
python-json-logger) for log collectors.

Every record written while an RPC is handled carries that RPC's request id (and, when tracing is on,
its trace and span ids), so a log line, an access line, an error message and a trace can be joined.
Records from a scheduler thread carry the id they were given (``extra={"request_id": ...}``).
"""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from vlm_service.observability import access

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class _CallContext(logging.Filter):
    """Adds the current RPC's ids to each record (only those that exist, for JSON)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            call = access.current_call()
            if call is not None:
                record.request_id = call.request_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class _TextCallContext(_CallContext):
    """For text lines: the request id in brackets after the logger's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


def json_formatter() -> logging.Formatter:
    """Each record as one JSON object: time, level, logger, message, then the call's fields."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
        timestamp="time",  # ISO 8601, UTC, microseconds
    )


def handler(log_format: str, stream=None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``log_format`` ("text" or "json")."""
    out = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        out.setFormatter(json_formatter())
        out.addFilter(_CallContext())
    else:
        out.setFormatter(logging.Formatter(_TEXT_FORMAT))
        out.addFilter(_TextCallContext())
    return out


def configure(level: str, log_format: str = "text") -> None:
    """Send every log record at ``level`` or above to stderr, as ``log_format``."""
    logging.basicConfig(level=level.upper(), handlers=[handler(log_format)], force=True)
    logging.captureWarnings(True)  # Python warnings become records (JSON lines too)
    # Loading bars and hub chatter are noise in a server log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
