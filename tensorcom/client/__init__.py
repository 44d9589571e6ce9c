"""The receiving side. ``Connection(urls)`` builds a :class:`StreamConnection` for stream URLs (zpull, zsub, ...)
or a :class:`RequestConnection` for the deterministic request protocol (zreq); both are ``Connection`` instances.

The classes load on first use (``tensorcom.client.Connection``), so that importing this package loads no zmq. Any
of them loads both kinds first: ``Connection(...)`` picks its kind from those registered, and each registers itself
when its module is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorcom.client._base import BatchInfo, Connection
    from tensorcom.client.request import RequestConnection, default_rank_and_world_size
    from tensorcom.client.stream import StreamConnection

__all__ = ["BatchInfo", "Connection", "RequestConnection", "StreamConnection", "default_rank_and_world_size"]

_HOMES = {
    "BatchInfo": "tensorcom.client._base",
    "Connection": "tensorcom.client._base",
    "RequestConnection": "tensorcom.client.request",
    "StreamConnection": "tensorcom.client.stream",
    "default_rank_and_world_size": "tensorcom.client.request",
}
_KINDS = ("tensorcom.client.stream", "tensorcom.client.request")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for kind in _KINDS:  # every kind registered before Connection is handed out
        importlib.import_module(kind)
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
