"""The sending side. ``Server(source, urls)`` builds a :class:`StreamServer` for push/pub URLs or a
:class:`RequestServer` (front end and worker processes) for ``zrep://`` URLs; :func:`run_server` is the run
loop of every server program (ready line, SIGTERM drain)."""

from __future__ import annotations

from tensorcom.server._base import Server
from tensorcom.server.request import RequestServer
from tensorcom.server.stream import StreamServer, serve

__all__ = ["RequestServer", "Server", "StreamServer", "serve"]
