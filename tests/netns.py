"""Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge, built with iproute2.

Layout of one :class:`Network` (every name carries the test run's pid, so parallel runs never collide)::

    namespace tcnet-PID-N-sw        veth pairs          host namespaces
    br0 ─┬─ p0  ═══════════════════════════  eth0 10.213.0.1/24   tcnet-PID-N-h0
         ├─ p1  ═══════════════════════════  eth0 10.213.0.2/24   tcnet-PID-N-h1
         └─ p2  ═══════════════════════════  eth0 10.213.0.3/24   tcnet-PID-N-h2

The bridge lives in a namespace of its own, so the root namespace gets no new link at all, and the test subnet has
no route anywhere else: traffic stays between the test hosts. :meth:`Network.cut` takes a host's port on the
bridge down (``ip link set pN down``), as pulling its cable would; :meth:`Network.restore` plugs it back in.
:meth:`Network.close` stops every process started in the hosts and deletes the namespaces, which removes the veth
pairs and the bridge with them; :func:`remove_leftovers` deletes what a killed run left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

from helpers import note_stderr_log, read_line, stop

from tensorcom._net.shm import process_alive

PREFIX = "tcnet-"
SUBNET = "10.213.0"
STOP_SECONDS = 10.0
IP_SECONDS = 10.0

_networks = iter(range(1_000_000))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; on failure raise with the command and its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_SECONDS)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """The names of the network namespaces that iproute2 knows."""
    listed = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@cache
def unavailable() -> str | None:
    """Why namespaced test hosts cannot be built here (a reason to skip), or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux; this is {sys.platform}"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root; running as uid {os.geteuid()}"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        added = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`ip netns add` cannot run: {error}"
    if added.returncode != 0:
        return f"`ip netns add` fails here: {added.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier test runs whose process is gone (a run killed before its teardown)."""
    removed = []
    for name in namespaces():
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not process_alive(int(owner)):
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One test host: a network namespace with loopback and one address on the test subnet."""

    name: str
    namespace: str
    address: str
    port: str  # its veth end on the bridge, in the switch namespace

    def command(self, *args: str) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]


@dataclass
class Network:
    """Test hosts on one bridge. Use as a context manager, or call :meth:`close`."""

    logs: Path
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{next(_networks)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.switch = f"{PREFIX}{self.tag}-sw"
        self._created: list[str] = []
        self._log_files: list[IO[str]] = []
        ip("netns", "add", self.switch)
        self._created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new host with the next address of the subnet (10.213.0.1, .2, ...), its link up."""
        number = len(self.hosts)
        host = Host(name, f"{PREFIX}{self.tag}-h{number}", f"{SUBNET}.{number + 1}", f"p{number}")
        ip("netns", "add", host.namespace)
        self._created.append(host.namespace)
        ip(
            "-n",
            self.switch,
            "link",
            "add",
            host.port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.namespace,
        )
        ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Take the host's link down: its packets go nowhere, and nobody else's reach it."""
        ip("-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        """Bring the host's link back up."""
        ip("-n", self.switch, "link", "set", host.port, "up")

    def start(
        self, host: Host, *args: str, stdin: bool = False, env: dict[str, str] | None = None
    ) -> Process:
        """Run ``python ARGS`` in ``host``, stdout piped (text) and stderr to a log file under ``logs``."""
        log = (self.logs / f"{host.name}-{len(self.processes)}.log").open("w")
        self._log_files.append(log)
        popen = subprocess.Popen(
            host.command(sys.executable, *args),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        self.processes.append(popen)
        note_stderr_log(popen, Path(log.name))
        return Process(popen, Path(log.name))

    def close(self) -> None:
        """Stop every process (terminate, then kill after a time limit) and delete every namespace."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            stop(process, STOP_SECONDS)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for log in self._log_files:
            log.close()
        for namespace in reversed(self._created):
            for pid in ip("netns", "pids", namespace, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "delete", namespace, check=False)
        self._created.clear()


class Process:
    """A process in a test host whose stdout is read one line at a time, each read with a time limit."""

    def __init__(self, popen: subprocess.Popen[str], log: Path) -> None:
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        """What the process logged so far."""
        return self.log.read_text(errors="replace")

    def records(self, timeout: float) -> Iterator[dict[str, Any]]:
        """The JSON objects that the process prints, one per line, until it ends (each within ``timeout``)."""
        while line := read_line(self.popen, timeout, allow_end=True):
            yield json.loads(line)

    def send(self, text: str = "") -> None:
        """Write a line to the process's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)


def leftovers(tag: str) -> tuple[list[str], str]:
    """Namespaces and root-namespace links whose names contain ``tag`` (both empty after a clean teardown)."""
    links = ip("-o", "link", check=False).stdout
    return [name for name in namespaces() if tag in name], "\n".join(
        line for line in links.splitlines() if tag in line
    )
