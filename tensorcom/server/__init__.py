"""The sending side. ``Server(source, urls)`` builds a :class:`StreamServer` for push/pub URLs or a
:class:`RequestServer` (front end and worker processes) for ``zrep://`` URLs; :func:`run_server` is the run
loop of every server program (ready line, SIGTERM drain).

The classes load on first use (``tensorcom.server.Server``), so that a program importing a light module of this
package (``tensorcom.server.signals``) does not load zmq. Any of them loads both kinds first: ``Server(...)`` picks
its kind from those registered, and each registers itself when its module is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for kind in _KINDS:  # every kind registered before Server is handed out
        importlib.import_module(kind)
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
