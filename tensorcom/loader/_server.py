"""The process that serves one SwiftLoader consumer: a local RequestServer over ``ipc://``, and its logging.

The parent starts :func:`serve_consumer` in a spawned process. It binds a
:class:`~tensorcom.server.request.RequestServer` (which spawns the ``worker_per_consumer`` worker processes), says
``ready`` (or what went wrong) on a pipe as one JSON message, and serves until the parent asks it to stop
(SIGTERM) or disappears (then it also removes the socket's folder). It ignores SIGINT: on Ctrl-C the parent
decides, and stops it on its way out. The worker processes inherit ``TENSORCOM_LOADER_ID`` in their environment, so they can be found in the process table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from functools import partial
from typing import Any

from tensorcom.errors import ConfigError
from tensorcom.loader._pipeline import PipelineSpec, dataset_of, forget_dataset, swift_pipeline
from tensorcom.server.request import RequestServer
from tensorcom.server.run import run_server

__all__ = ["LOADER_ID_VARIABLE", "LogSpec", "make_log_handlers", "serve_consumer"]

LOADER_ID_VARIABLE = "TENSORCOM_LOADER_ID"
_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """Where a consumer logs: a file (``path``), standard output, and the level."""

    path: str | None = None
    stdout: bool = False
    level: int = logging.INFO

    @classmethod
    def parse(cls, value: Any, consumer: int) -> LogSpec | None:
        """From the ``logger`` option: None, a file prefix, or ``{"path", "stdout", "level"}``."""
        if value is None:
            return None
        if isinstance(value, str | os.PathLike):
            return cls(path=_log_path(os.fspath(value), consumer))
        if not isinstance(value, dict):
            raise ConfigError(
                f"logger must be a file prefix or a dict with path, stdout, level. Found: {value!r}"
            )
        unknown = sorted(set(value) - {"path", "stdout", "level"})
        if unknown:
            raise ConfigError(f"logger dict keys must be among path, stdout, level. Found: {unknown}")
        path = value.get("path")
        if path is not None and not isinstance(path, str | os.PathLike):
            raise ConfigError(f"logger path must be a file prefix. Found: {path!r}")
        level = value.get("level", logging.INFO)
        if isinstance(level, str):
            number = logging.getLevelName(level.upper())
            if not isinstance(number, int):
                raise ConfigError(
                    f"logger level must be DEBUG, INFO, WARNING, ERROR or CRITICAL. Found: {level!r}"
                )
            level = number
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigError(f"logger level must be a level name or number. Found: {level!r}")
        return cls(
            path=None if path is None else _log_path(os.fspath(path), consumer),
            stdout=bool(value.get("stdout", False)),
            level=level,
        )


def _log_path(prefix: str, consumer: int) -> str:
    separator = "" if prefix.endswith((os.sep, "_", "-", ".")) else "_"
    return f"{prefix}{separator}consumer{consumer}.log"


def make_log_handlers(spec: LogSpec) -> list[logging.Handler]:
    """The handlers a LogSpec asks for (the caller attaches and, at the end, closes them)."""
    handlers: list[logging.Handler] = []
    if spec.path is not None:
        directory = os.path.dirname(spec.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        handlers.append(logging.FileHandler(spec.path, encoding="utf-8"))
    if spec.stdout:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.setLevel(spec.level)
    return handlers


def _send(pipe: Any, **message: Any) -> None:
    pipe.send_bytes(json.dumps(message).encode("utf-8"))


def serve_consumer(
    spec: PipelineSpec,
    url: str,
    workers: int,
    queue: int,
    parent: int,
    pipe: Any,
    log_spec: LogSpec | None,
    loader_id: str,
    name: str,
) -> None:
    """The server process of one consumer (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ[LOADER_ID_VARIABLE] = loader_id
    handlers = make_log_handlers(log_spec) if log_spec is not None else []
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    if log_spec is not None:
        root.setLevel(log_spec.level)
    log = logging.getLogger(__name__)
    try:
        if spec.n <= 0:
            dataset = dataset_of(spec.dataset_class, spec.dataset_kwargs)
            spec = dataclasses.replace(spec, n=len(dataset))
            del dataset
            forget_dataset(spec.dataset_class, spec.dataset_kwargs)
            if spec.n <= 0:
                raise ConfigError("the dataset is empty (len() is 0)")
        server = RequestServer(
            partial(swift_pipeline, spec=spec), url, workers=workers, queue=queue, name=name
        )
    except Exception as exc:
        _send(pipe, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        pipe.close()
        return
    stopped = threading.Event()

    def watch_parent() -> None:
        while not stopped.wait(0.2):
            if os.getppid() != parent:
                log.warning("%s: the loader's process is gone; stopping", name)
                server.stop()

    def announce(_: Any) -> None:
        _send(pipe, ready=True, n=spec.n)
        pipe.close()

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    try:
        run_server(server, announce=announce)
    finally:
        stopped.set()
        if os.getppid() != parent:  # nobody else is left to remove the socket's folder
            folder = os.path.dirname(url.split("://", 1)[1])
            if os.path.basename(folder).startswith("tensorcom-loader-"):
                shutil.rmtree(folder, ignore_errors=True)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
