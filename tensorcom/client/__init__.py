"""The receiving side: :class:`Connection` for stream URLs (zpull, zsub, ...) and :class:`RequestConnection` for the
deterministic request protocol (zreq)."""

from __future__ import annotations

from tensorcom.client.request import RequestConnection
from tensorcom.client.stream import BatchInfo, Connection

__all__ = ["BatchInfo", "Connection", "RequestConnection"]
