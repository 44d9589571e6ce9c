"""tensorcom: deterministic, disaggregated data loading over ZeroMQ.

The codec, URL and error modules load eagerly and need only numpy; the zmq-based client and server load on first
use, so ``import tensorcom.codec`` (or ``tensorcom.pipeline``) pulls in neither zmq nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorcom import codec
from tensorcom._lazy import lazy_exports
from tensorcom.errors import (
    ConfigError,
    DecodeError,
    PipelineError,
    ProtocolError,
    RemoteError,
    SecurityError,
    StateError,
    TensorcomError,
    Timeout,
    URLError,
    WorkerError,
)
from tensorcom.pipeline import (
    Collate,
    Conveyer,
    DistributedBatchedMap,
    Join,
    Map,
    Partition,
    Permutation,
    PipelineBuilder,
    Range,
)
from tensorcom.urls import ParsedURL, expand_urls, parse_url

if TYPE_CHECKING:
    from tensorcom.client import BatchInfo, Connection, RequestConnection, StreamConnection
    from tensorcom.loader import SwiftLoader
    from tensorcom.server import RequestServer, Server, StreamServer, serve

__version__ = "0.2.0.dev0"

_LAZY = {
    "BatchInfo": "tensorcom.client",
    "Connection": "tensorcom.client",
    "RequestConnection": "tensorcom.client",
    "RequestServer": "tensorcom.server",
    "Server": "tensorcom.server",
    "StreamConnection": "tensorcom.client",
    "StreamServer": "tensorcom.server",
    "SwiftLoader": "tensorcom.loader",
    "serve": "tensorcom.server",
}

__all__ = [
    "BatchInfo",
    "Collate",
    "ConfigError",
    "Connection",
    "Conveyer",
    "DecodeError",
    "DistributedBatchedMap",
    "Join",
    "Map",
    "ParsedURL",
    "Partition",
    "Permutation",
    "PipelineBuilder",
    "PipelineError",
    "ProtocolError",
    "Range",
    "RemoteError",
    "RequestConnection",
    "RequestServer",
    "SecurityError",
    "Server",
    "StateError",
    "StreamConnection",
    "StreamServer",
    "SwiftLoader",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
