"""Helpers shared by the request, security, fuzz, fault and load tests: reference batches, CURVE key files, the
reliability log (processes, batch comparison and RSS are in helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def reference(factory: Callable[..., Any], count: int | None = None, **config: Any) -> list[Any]:
    """The batches of a factory's pipeline computed in this process, without any server."""
    with factory(**config) as pipeline:
        batches = []
        for batch in pipeline:
            batches.append(batch)
            if count is not None and len(batches) == count:
                break
        return batches


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


def record(name: str, **figures: Any) -> None:
    """Append one test's figures (cases tried, faults survived, ...) as a JSON line to $TENSORCOM_RELIABILITY_LOG,
    when it is set: the source of the figures quoted in RELIABILITY.md."""
    import json

    path = os.environ.get("TENSORCOM_RELIABILITY_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"test": name, **figures}) + "\n")
