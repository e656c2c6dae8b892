"""Python client for vlm-service: stream captions and answers from a VisionLanguageService."""

from ._messages import ModelInfo, Usage
from .client import AsyncTextStream, AsyncVLMClient, TextStream, VLMClient
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
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
    "Unavailable",
    "Usage",
    "VLMClient",
    "VLMError",
]
