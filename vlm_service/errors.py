"""Typed domain errors. The error interceptor maps each to one gRPC status code (api/status.py).

Messages are written for the client: they say what is wrong with the request and never carry
paths, tracebacks or internals.
"""

from __future__ import annotations

from dataclasses import dataclass


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidInput(ServiceError):
    """The request is malformed (INVALID_ARGUMENT). ``field`` names the offending request field."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}")
        self.field, self.description = field, description
        self.violations = (FieldViolation(field, description),)

    def __reduce__(self):  # raised in a decoding process, it crosses to the server by pickle
        return type(self), (self.field, self.description)

    def under(self, parent: str) -> InvalidInput:
        """The same error for the field as a part of ``parent`` (``options.top_p`` in ``config``)."""
        return InvalidInput(f"{parent}.{self.field}", self.description)


class MalformedMessage(ServiceError):
    """A message of a request stream whose bytes are not a valid message (INVALID_ARGUMENT)."""


class ModelNotFound(ServiceError):
    """The named model is not served (NOT_FOUND)."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"model {name!r} is not served here; available: {', '.join(available)}")


class NotSupported(ServiceError):
    """The model cannot do what the RPC asks (FAILED_PRECONDITION): Detect or Point on a model that does
    not ground. Another model may; ListModels says which."""


class ModelNotReady(ServiceError):
    """The model is loading or has failed (UNAVAILABLE); ``retry_after`` is a hint in seconds."""

    retry_after = 1.0


class QueueFull(ServiceError):
    """The model's queue is full (RESOURCE_EXHAUSTED); ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ServiceError):
    """The server is draining and takes no new work (UNAVAILABLE)."""


class GenerationFailed(ServiceError):
    """The model failed (INTERNAL). The message is opaque apart from the request id in the logs."""

    def __init__(self, request_id: str):
        super().__init__(f"generation failed; see the server log for request id {request_id}")
        self.request_id = request_id


class DeadlineUnmeetable(ServiceError):
    """The request's deadline would pass before its turn comes (DEADLINE_EXCEEDED, refused at once)."""


class DeadlineExpired(ServiceError):
    """The request's deadline passed while it waited in the queue; it never started (DEADLINE_EXCEEDED)."""


class GenerationStalled(ServiceError):
    """The model made no progress for the stall timeout (ABORTED); the generation was stopped."""


class ReaderStalled(ServiceError):
    """The client read nothing for so long while output waited that the generation was stopped (ABORTED)."""


class OutOfMemory(ServiceError):
    """The model ran out of memory on this request (RESOURCE_EXHAUSTED); the memory was freed."""

    def __init__(self, request_id: str):
        super().__init__(
            f"the model ran out of memory on this request (request id {request_id}); "
            "retry later, or with a smaller image or max_new_tokens"
        )
        self.request_id = request_id
        self.retry_after = 5.0
