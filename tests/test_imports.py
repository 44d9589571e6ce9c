"""tensorcom.pipeline imports neither zmq nor torch at module level, and exports a sorted public API."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import tensorcom.pipeline

PACKAGE = Path(tensorcom.pipeline.__file__).parent


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_level_zmq_or_torch() -> None:
    """No module of the package imports zmq or torch at import time."""
    for path in sorted(PACKAGE.glob("*.py")):
        assert not _top_level_imports(path) & {"zmq", "torch"}, path.name


def test_importing_pipeline_adds_neither_zmq_nor_torch() -> None:
    """Importing tensorcom.pipeline loads no zmq or torch beyond what importing tensorcom itself loads."""
    code = (
        "import sys, json; import tensorcom; base = {m for m in ('zmq', 'torch') if m in sys.modules};"
        "import tensorcom.pipeline; after = {m for m in ('zmq', 'torch') if m in sys.modules};"
        "print(json.dumps(sorted(after - base)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_public_api_is_sorted_and_complete() -> None:
    """__all__ is sorted and every name in it exists."""
    names = tensorcom.pipeline.__all__
    assert names == sorted(names)
    assert all(hasattr(tensorcom.pipeline, n) for n in names)
