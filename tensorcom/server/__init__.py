"""The sending side. ``Server(source, urls)`` builds a :class:`StreamServer` for push/pub URLs or a
:class:`RequestServer` (front end and worker processes) for ``zrep://`` URLs; :func:`run_server` is the run
loop of every server program (ready line, SIGTERM drain).

The classes load on first use (``tensorcom.server.Server``), so that a program importing a light module of this
package (``tensorcom.server.signals``) does not load zmq. Any of them loads both kinds first: ``Server(...)`` picks
its kind from those registered, and each registers itself when its module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorcom._lazy import lazy_exports

if TYPE_CHECKING:
    from tensorcom.server._base import Server
    from tensorcom.server.request import RequestServer
    from tensorcom.server.stream import StreamServer, serve

__all__ = ["RequestServer", "Server", "StreamServer", "serve"]

_HOMES = {
    "RequestServer": "tensorcom.server.request",
    "Server": "tensorcom.server._base",
    "StreamServer": "tensorcom.server.stream",
    "serve": "tensorcom.server.stream",
}
_KINDS = ("tensorcom.server.stream", "tensorcom.server.request")


# every kind registered before any class is handed out
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, load_first=_KINDS)
