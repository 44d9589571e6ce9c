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


@pytest.mark.parametrize(
    "entry",
    [
        "tensorcom.cli.main:main",
        "tensorcom_tools.tensormon:main",
        "tensorcom_tools.tensorshow:main",
        "tensorcom_tools.tensorstat:main",
        "tensorcom_servers.synthetic:main",
        "tensorcom_servers.imagenet_dir:main",
        "tensorcom_servers.imagenet_shards:main",
    ],
    ids=lambda entry: entry.split(":")[0].rpartition(".")[2],
)
def test_help_loads_no_heavy_library(entry: str) -> None:
    """PROGRAM --help loads neither ml_dtypes, torch, Keras, matplotlib nor Pillow."""
    module, _, function = entry.partition(":")
    code = f"import importlib\nsys.argv = ['program', '--help']\nimportlib.import_module({module!r}).{function}()\n"
    assert loaded_after(code) == []


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
