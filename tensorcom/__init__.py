"""tensorcom: deterministic, disaggregated data loading over ZeroMQ."""

from __future__ import annotations

from tensorcom.errors import (
    ConfigError,
    DecodeError,
    PipelineError,
    ProtocolError,
    RemoteError,
    StateError,
    TensorcomError,
    Timeout,
    URLError,
    WorkerError,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "ConfigError",
    "DecodeError",
    "PipelineError",
    "ProtocolError",
    "RemoteError",
    "StateError",
    "TensorcomError",
    "Timeout",
    "URLError",
    "WorkerError",
    "__version__",
]
