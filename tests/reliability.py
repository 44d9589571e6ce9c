"""Helpers shared by the request, security, fuzz, fault and load tests: `tensorcom serve` processes with any options,
reference batches, CURVE key files, RSS."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).parent

StartProcess = Callable[..., subprocess.Popen[bytes]]


def serve(
    start_process: StartProcess,
    factory: str,
    *args: str,
    workers: int = 1,
    port: int = 0,
    env: dict[str, str] | None = None,
    stderr: Any = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `tensorcom serve FACTORY ARGS` on 127.0.0.1 and return the process and its zreq URL once it is ready."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    command = ["-m", "tensorcom.cli", "serve", factory, "-q", "--bind", f"zrep://127.0.0.1:{port}"]
    command += ["-w", str(workers), *args]
    process = start_process(*command, stdout=subprocess.PIPE, stderr=stderr, env=environment)
    assert process.stdout is not None
    line = process.stdout.readline().decode().split()
    assert line[:1] == ["ready"], f"server did not start: {line}"
    return process, line[1].replace("tcp://", "zreq://")


def reference(factory: Callable[..., Any], count: int | None = None, **config: Any) -> list[Any]:
    """The batches of a factory's pipeline computed in this process, without any server."""
    with factory(**config) as pipeline:
        batches = []
        for batch in pipeline:
            batches.append(batch)
            if count is not None and len(batches) == count:
                break
        return batches


def same(left: list[Any], right: list[Any]) -> bool:
    """Bit-identical lists of batches (tuples/lists of arrays, or dicts of arrays)."""
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        if isinstance(a, dict):
            if a.keys() != b.keys() or not all(np.array_equal(a[k], b[k]) for k in a):
                return False
        elif len(a) != len(b) or not all(
            x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True)
        ):
            return False
    return True


class Keys:
    """Key files written by `tensorcom keygen`: a server, an allowed client 'alice', and 'mallory' from another key
    set, whose key is not allowed."""

    def __init__(self, root: Path) -> None:
        from click.testing import CliRunner

        from tensorcom.cli import main

        for folder, client in (("set", "alice"), ("other", "mallory")):
            result = CliRunner().invoke(main, ["keygen", str(root / folder), "--client", client])
            assert result.exit_code == 0, result.output
        self.server_secret = root / "set" / "server.key_secret"
        self.server_public = root / "set" / "server.key"
        self.allowed = root / "set" / "clients"
        self.alice = root / "set" / "alice.key_secret"
        self.mallory = root / "other" / "mallory.key_secret"
        self.other_server_public = root / "other" / "server.key"

    def server(self) -> dict[str, Any]:
        return {"server_key": self.server_secret, "client_keys": self.allowed}

    def client(self, who: str = "alice", server_public: Path | None = None) -> dict[str, Any]:
        key = self.alice if who == "alice" else self.mallory
        return {"client_key": key, "server_public_key": server_public or self.server_public}

    def serve_args(self) -> list[str]:
        return ["--server-key", str(self.server_secret), "--client-keys", str(self.allowed)]

    def server_variables(self) -> dict[str, str]:
        """The environment that gives a server this set's keys, as `tensorcom keygen` prints it."""
        return {"TENSORCOM_SERVER_KEY": str(self.server_secret), "TENSORCOM_CLIENT_KEYS": str(self.allowed)}

    def client_variables(self, who: str = "alice") -> dict[str, str]:
        """The environment that gives a client its key pair and the server's public key."""
        key = self.alice if who == "alice" else self.mallory
        return {"TENSORCOM_CLIENT_KEY": str(key), "TENSORCOM_SERVER_PUBLIC_KEY": str(self.server_public)}


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def rss_kib(pid: int, with_children: bool = True) -> int:
    """Resident memory of a process (and its children) in KiB."""
    total = 0
    for candidate in [pid, *(children_of(pid) if with_children else [])]:
        try:
            with open(f"/proc/{candidate}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (FileNotFoundError, StopIteration):
            pass
    return total


def record(name: str, **figures: Any) -> None:
    """Append one test's figures (cases tried, faults survived, ...) as a JSON line to $TENSORCOM_RELIABILITY_LOG,
    when it is set: the source of the figures quoted in RELIABILITY.md."""
    import json

    path = os.environ.get("TENSORCOM_RELIABILITY_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"test": name, **figures}) + "\n")
