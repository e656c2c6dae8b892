"""Python client for vlm-service: stream captions and answers from a VisionLanguageService."""

from ._messages import ModelInfo, Usage
from .client import AsyncTextStream, AsyncVLMClient, TextStream, VLMClient, channel_credentials
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
    VLMError,
)

__all__ = [
    "AsyncTextStream",
    "AsyncVLMClient",
    "Cancelled",
    "DeadlineExceeded",
    "InvalidArgument",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "TextStream",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "VLMClient",
    "VLMError",
    "channel_credentials",
]
