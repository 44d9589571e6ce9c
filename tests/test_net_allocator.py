"""glibc allocator thresholds: set by servers and connections, observable as memory kept for reuse, and left alone
when the user opted out or chose their own."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Allocate 32 blocks of 1 MiB, free them, and report how much of that memory the process still holds.
PROBE = """
import sys
from tensorcom._net import allocator
{setup}
def resident_kib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4
before = resident_kib()
blocks = [bytearray(1 << 20) for _ in range(32)]
del blocks
print(allocator._result, (resident_kib() - before) // 1024)
"""


def probe(setup: str = "allocator.tune()", **environment: str) -> tuple[str, int]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", "TENSORCOM_MALLOC"))
    }
    env.update(environment)
    output = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup)], env=env, capture_output=True, text=True, timeout=60
    )
    assert output.returncode == 0, output.stderr
    result, kept_mib = output.stdout.split()
    return result, int(kept_mib)


def test_tuned_process_keeps_freed_blocks_for_reuse() -> None:
    """With the thresholds set, 1 MiB blocks come from the heap and stay there once freed (ready for the next
    batch); with glibc's starting thresholds each is mapped on its own and unmapped when freed."""
    assert probe() == ("True", pytest.approx(32, abs=8))
    result, kept = probe(TENSORCOM_MALLOC="0")
    assert result == "False" and kept < 8


def test_user_choice_is_left_alone() -> None:
    """A process started with its own malloc thresholds keeps them."""
    result, kept = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert result == "False" and kept < 8
    result, _ = probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert result == "False"


def test_connections_and_servers_set_the_thresholds() -> None:
    """Creating a Connection (or a server) is enough: the training process needs no extra call."""
    setup = "import tensorcom\ntensorcom.Connection('zpull://127.0.0.1:0', timeout=1).close()"
    assert probe(setup) == ("True", pytest.approx(32, abs=8))
    setup = "import tensorcom\ntensorcom.Server(None, 'zrpush://127.0.0.1:0').close()"
    assert probe(setup)[0] == "True"
