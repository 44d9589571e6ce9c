"""The sending side: :class:`Server` for stream URLs (zpush, zpub, ...) and :class:`RequestServer` for the
deterministic request protocol (zrep)."""

from __future__ import annotations

from tensorcom.server.request import RequestServer
from tensorcom.server.stream import Server, serve

__all__ = ["RequestServer", "Server", "serve"]
