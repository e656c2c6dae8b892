"""Python client for vlm-service: stream captions and answers from a VisionLanguageService."""

from importlib.metadata import PackageNotFoundError, version

from ._messages import Box, ImageTiling, Malformed, ModelInfo, Point, Usage
from .client import (
    CONNECTION_OPTIONS,
    HEALTH_CHECK_CONFIG,
    MODEL_HEADER,
    RETRY_POLICY,
    SERVICE_CONFIG,
    AsyncFrameAnswer,
    AsyncRegionStream,
    AsyncTextStream,
    AsyncVLMClient,
    AsyncWatchStream,
    FrameAnswer,
    RegionStream,
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
    FailedPrecondition,
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
    "AsyncRegionStream",
    "AsyncTextStream",
    "AsyncVLMClient",
    "AsyncWatchStream",
    "Cancelled",
    "Box",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FrameAnswer",
    "ImageTiling",
    "InvalidArgument",
    "Malformed",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "Point",
    "RegionStream",
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
