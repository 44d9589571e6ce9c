"""The public face survived the move into folders: names, module paths, console scripts and dir(tensorcom)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

import tensorcom

# tensorcom.__all__ before the package moved into folders (issue 17): each must keep working
NAMES_BEFORE_THE_MOVE = [
    "BatchInfo", "Collate", "ConfigError", "Connection", "Conveyer", "DecodeError", "DistributedBatchedMap",
    "Join", "Map", "ParsedURL", "Partition", "Permutation", "PipelineBuilder", "PipelineError", "ProtocolError",
    "Range", "RemoteError", "SecurityError", "Server", "StateError", "SwiftLoader", "TensorcomError", "Timeout",
    "URLError", "WorkerError", "__version__", "codec", "expand_urls", "parse_url", "serve",
]  # fmt: skip
SCRIPTS = [
    "tensorcom",
    "serve-synthetic",
    "serve-imagenet-dir",
    "serve-imagenet-shards",
    "tensormon",
    "tensorshow",
    "tensorstat",
]


@pytest.mark.parametrize("name", NAMES_BEFORE_THE_MOVE)
def test_every_name_exported_before_the_move_still_resolves(name: str) -> None:
    """Each name of the old tensorcom.__all__ is still exported and resolves."""
    assert name in tensorcom.__all__
    assert getattr(tensorcom, name) is not None


def test_dir_lists_the_lazily_loaded_names() -> None:
    """dir(tensorcom) in a fresh interpreter lists every exported name, the lazy ones (Connection, Server) too."""
    code = "import tensorcom, json; print(json.dumps(sorted(set(tensorcom.__all__) - set(dir(tensorcom)))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["tensorcom.codec", "tensorcom.urls", "tensorcom.errors", "tensorcom.pipeline",
                                    "tensorcom.loader"])  # fmt: skip
def test_module_paths_users_import_still_exist(module: str) -> None:
    """The module paths users import (codec, urls, errors, pipeline, loader) are where they were."""
    assert importlib.import_module(module).__name__ == module


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_are_installed_and_answer_help(script: str) -> None:
    """Every console script is on PATH next to this interpreter and prints its help."""
    path = shutil.which(script, path=str(sys.prefix + "/bin"))
    assert path is not None, f"{script} is not installed in {sys.prefix}/bin"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
