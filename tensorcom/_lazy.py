"""Names a package exports but loads on first use (module ``__getattr__``/``__dir__``, PEP 562), so that importing
the package stays cheap: ``import tensorcom`` loads no zmq until ``tensorcom.Connection`` is used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, homes: Mapping[str, str], load_first: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``homes`` is read from its module (``homes[name]``) on
    first use and kept in the package; the modules of ``load_first`` are imported before any of them (to fill a
    registry that the names rely on). ``__dir__`` lists the names not loaded yet too."""

    def get(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        for module in load_first:
            importlib.import_module(module)
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)
        return value

    def names() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return get, names
