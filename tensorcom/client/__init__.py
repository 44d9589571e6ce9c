"""The receiving side. ``Connection(urls)`` builds a :class:`StreamConnection` for stream URLs (zpull, zsub, ...)
or a :class:`RequestConnection` for the deterministic request protocol (zreq); both are ``Connection`` instances.

The classes load on first use (``tensorcom.client.Connection``), so that importing this package loads no zmq. Any
of them loads both kinds first: ``Connection(...)`` picks its kind from those registered, and each registers itself
when its module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorcom._lazy import lazy_exports

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


# every kind registered before any class is handed out
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, load_first=_KINDS)
