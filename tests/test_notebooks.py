"""The example notebooks and the ImageNet demo execute without error, so they never rot.

Each notebook runs in a fresh Python process that executes its code cells in order in one namespace, as a
kernel would (the notebooks use no IPython magics), with fewer training steps than a reader would run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"

RUNNER = """
import json, subprocess, sys
cells = json.load(open(sys.argv[1]))["cells"]
namespace = {"__name__": "__main__"}
try:
    for number, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{sys.argv[1]} cell {number}", "exec"), namespace)
finally:  # a failed notebook must not leave its server running
    for value in list(namespace.values()):
        if isinstance(value, subprocess.Popen) and value.poll() is None:
            value.terminate()
            value.wait(timeout=20)
"""


def test_notebooks_have_only_plain_python_cells() -> None:
    """Both notebooks exist and hold no outputs and no IPython magics (so the runner equals a kernel)."""
    for name in ("pytorch.ipynb", "keras.ipynb"):
        cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        assert code and all(not cell["outputs"] for cell in code)
        assert not any(line.lstrip().startswith(("!", "%")) for cell in code for line in cell["source"])


@pytest.mark.parametrize("name", ["pytorch.ipynb", "keras.ipynb"], ids=["pytorch", "keras"])
def test_notebook_executes(name: str, tmp_path: Path) -> None:
    """Every code cell runs without error: server start, training, state, resume, shutdown."""
    environment = {**os.environ, "TENSORCOM_NOTEBOOK_STEPS": "12", "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(NOTEBOOKS / name)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=tmp_path,
        start_new_session=True,  # its own process group: a timeout kills the servers it started too
    )
    try:
        stdout, stderr = process.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{name} did not finish in 100 s: {stdout[-2000:]} {stderr[-2000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "resumed" in stdout


def test_imagenet_demo_runs(tmp_path: Path) -> None:
    """`make demo`'s ImageNet part (few steps): it trains, checkpoints, resumes, checks the resume, reports."""
    result = subprocess.run(
        [sys.executable, "-m", "tensorcom.examples.imagenet_demo", "--data", str(tmp_path / "images")]
        + ["--steps", "8", "-b", "8", "--size", "16", "-w", "1"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resume check" in result.stdout and "images/s" in result.stdout
