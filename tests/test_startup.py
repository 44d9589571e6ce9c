"""Start-up cost: ``import tensorcom`` and every program's ``--help`` load no heavy library they do not need.

Counted as modules loaded in a fresh interpreter, not as seconds, so the checks hold on a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tensorcom import codec

HEAVY = ("ml_dtypes", "torch", "keras", "matplotlib", "PIL")

_LOADED = (
    "import json, sys\n"
    "heavy = {heavy!r}\n"
    "def report():\n"
    "    print(json.dumps(sorted(name for name in heavy if name in sys.modules)), file=sys.__stderr__)\n"
)


def loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it loaded (reported even when it exits)."""
    program = _LOADED.format(heavy=heavy) + "import atexit\natexit.register(report)\n" + code
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    loaded: list[str] = json.loads(last)
    return loaded


def test_import_tensorcom_loads_no_heavy_library() -> None:
    """import tensorcom (and its codec, URLs and pipeline) loads neither ml_dtypes, torch nor zmq."""
    assert loaded_after("import tensorcom, tensorcom.codec, tensorcom.pipeline", (*HEAVY, "zmq")) == []


PROGRAMS = {
    "tensorcom": "tensorcom.cli.main:main",
    "tensormon": "tensorcom_tools.tensormon:main",
    "tensorshow": "tensorcom_tools.tensorshow:main",
    "tensorstat": "tensorcom_tools.tensorstat:main",
    "serve-synthetic": "tensorcom_servers.synthetic:main",
    "serve-imagenet-dir": "tensorcom_servers.imagenet_dir:main",
    "serve-imagenet-shards": "tensorcom_servers.imagenet_shards:main",
}


def run_program(entry: str, *args: str) -> str:
    """Code that runs the program at ``entry`` (MODULE:FUNCTION) with ``args`` in a fresh interpreter."""
    module, _, function = entry.partition(":")
    argv = ["program", *args]
    return f"import importlib\nsys.argv = {argv!r}\nimportlib.import_module({module!r}).{function}()\n"


@pytest.mark.parametrize("entry", list(PROGRAMS.values()), ids=list(PROGRAMS))
@pytest.mark.parametrize("flag", ["--help", "--version"], ids=["help", "version"])
def test_help_and_version_load_no_heavy_library(entry: str, flag: str) -> None:
    """PROGRAM --help and --version load neither zmq, ml_dtypes, torch, Keras, matplotlib nor Pillow."""
    assert loaded_after(run_program(entry, flag), (*HEAVY, "zmq")) == []


def test_server_and_client_packages_load_zmq_on_first_use() -> None:
    """Importing tensorcom.server, tensorcom.client or tensorcom.server.signals loads no zmq; their classes load
    it when first asked for, and Server then knows both kinds (it dispatches by URL)."""
    code = (
        "import tensorcom.server, tensorcom.client, tensorcom.server.signals\n"
        "assert 'zmq' not in sys.modules\n"
        "from tensorcom.server import Server\n"
        "assert sorted(Server._kinds) == ['PUB', 'PUSH', 'ROUTER'], Server._kinds\n"
        "from tensorcom.client import Connection\n"
        "assert sorted(Connection._kinds) == ['zpull', 'zreq', 'zrpull', 'zrsub', 'zsub'], Connection._kinds\n"
    )
    assert loaded_after(code, ("zmq",)) == ["zmq"]


def test_bfloat16_decodes_without_ml_dtypes_imported_first() -> None:
    """A bf16 batch decodes in a process that never imported ml_dtypes: the codec loads it on first use."""
    frames = [bytes(frame).hex() for frame in codec.encode([np.array([1.5, -2.0], ml_dtypes.bfloat16)])]
    code = (
        "from tensorcom import codec\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"(value,) = codec.decode([bytes.fromhex(frame) for frame in {frames!r}])\n"
        "assert codec.is_bfloat16(value.dtype) and value.astype('float32').tolist() == [1.5, -2.0]\n"
    )
    assert loaded_after(code, ("ml_dtypes",)) == ["ml_dtypes"]
