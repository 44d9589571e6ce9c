"""The receiving side. ``Connection(urls)`` builds a :class:`StreamConnection` for stream URLs (zpull, zsub, ...)
or a :class:`RequestConnection` for the deterministic request protocol (zreq); both are ``Connection`` instances."""

from __future__ import annotations

from tensorcom.client._base import BatchInfo, Connection
from tensorcom.client.request import RequestConnection, default_rank_and_world_size
from tensorcom.client.stream import StreamConnection

__all__ = ["BatchInfo", "Connection", "RequestConnection", "StreamConnection", "default_rank_and_world_size"]
