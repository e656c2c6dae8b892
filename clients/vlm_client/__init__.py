"""Python client for vlm-service: stream captions and answers from a VisionLanguageService."""

from importlib.metadata import PackageNotFoundError, version

from ._messages import ImageTiling, ModelInfo, Usage
from .client import (
    CONNECTION_OPTIONS,
    HEALTH_CHECK_CONFIG,
    MODEL_HEADER,
    RETRY_POLICY,
    SERVICE_CONFIG,
    AsyncFrameAnswer,
    AsyncTextStream,
    AsyncVLMClient,
    AsyncWatchStream,
    FrameAnswer,
    TextStream,
    VLMClient,
    WatchStream,
    channel_credentials,
    channel_options,
)
from .errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
    VLMError,
)

try:
    __version__ = version("vlm-client")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CONNECTION_OPTIONS",
    "HEALTH_CHECK_CONFIG",
    "MODEL_HEADER",
    "RETRY_POLICY",
    "SERVICE_CONFIG",
    "Aborted",
    "AsyncFrameAnswer",
    "AsyncTextStream",
    "AsyncVLMClient",
    "AsyncWatchStream",
    "Cancelled",
    "DeadlineExceeded",
    "FieldViolation",
    "FrameAnswer",
    "ImageTiling",
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
    "WatchStream",
    "__version__",
    "channel_credentials",
    "channel_options",
]
