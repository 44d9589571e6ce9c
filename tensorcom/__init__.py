"""tensorcom: deterministic, disaggregated data loading over ZeroMQ."""

from __future__ import annotations

from tensorcom import codec
from tensorcom.connection import BatchInfo, Connection
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
from tensorcom.server import Server, serve
from tensorcom.urls import ParsedURL, expand_urls, parse_url

__version__ = "0.2.0.dev0"

__all__ = [
    "BatchInfo",
    "Connection",
    "ParsedURL",
    "Server",
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
    "codec",
    "expand_urls",
    "parse_url",
    "serve",
]
