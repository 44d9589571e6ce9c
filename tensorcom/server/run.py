"""The run loop of every server program (``tensorcom serve``, ``serve-imagenet-dir``, ``serve-imagenet-shards``,
``serve-synthetic``, the SwiftLoader's consumer servers): signals, readiness, run.

::

    server = Server(...)                      sockets bound; errors so far are configuration errors
    run_server(server, drain=10, announce=f)  SIGTERM handler in place, then f(server) (e.g. print the ready line),
                                              then server.run(): rate reports every report_interval seconds
    SIGTERM                                   server.stop(drain): finish what it holds for at most `drain` s, exit
    second SIGTERM, SIGINT, or drain + grace  KeyboardInterrupt: close at once

A program prints :func:`ready_line` so that whoever started it (a test, a supervisor, a demo) can wait for it and
connect with the URLs it names as they are.

Several stream URLs on one command line (``zpub://h:788{0..3}``) are several publishers: :func:`run_publishers`
runs each in a process of its own, each sending a distinct share of the stream, so that the augmentation work
scales with them and a client of all of them (``zsub://h:788{0..3}``) receives every batch once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from tensorcom.errors import ConfigError, TensorcomError
from tensorcom.server._base import Server
from tensorcom.server.signals import drain_on_sigterm, stop_on_sigterm

__all__ = ["ready_line", "run_publishers", "run_server"]

log = logging.getLogger(__name__)


def ready_line(server: Server) -> str:
    """``ready URL...``: the line a server program prints once clients may connect, with the URLs they use."""
    return "ready " + " ".join(server.client_urls)


def run_server(
    server: Server, *, drain: float | None = None, announce: Callable[[Server], None] | None = None
) -> int:
    """Run ``server`` until its source ends, SIGINT or SIGTERM, and return the number of batches it sent.

    The first SIGTERM stops it after finishing what it holds for at most ``drain`` seconds (None: at once); a second
    SIGTERM or SIGINT stops it at once. ``announce(server)`` is called once the signal handler is in place, so
    that a SIGTERM sent as soon as the server says it is ready already drains. Call it on the main thread.
    """
    with drain_on_sigterm(server, drain):
        if announce is not None:
            announce(server)
        try:
            return server.run()
        except KeyboardInterrupt:
            return server.served


def run_publishers(
    build: Callable[[int], Server],
    count: int,
    *,
    drain: float | None = None,
    announce: Callable[[list[str]], None] | None = None,
    ready_timeout: float = 600.0,
) -> int:
    """Run ``count`` publishers, each ``build(k)`` served by :func:`run_server` in a process of its own (forked, so
    what the caller has loaded, such as an indexed dataset, is shared), and return how many of them failed.

    Once every publisher is listening, ``announce(urls)`` gets their client URLs in order. SIGTERM is passed on to
    the publishers (each drains for at most ``drain`` seconds); SIGINT stops them at once; a publisher that fails
    stops the others (the stream would miss its share). Call it on the main thread, before any zmq context exists.
    """
    if count < 1:
        raise ConfigError(f"publishers must be >= 1. Found: {count}")
    context = multiprocessing.get_context("fork")
    processes: list[Any] = []
    receivers: list[Any] = []
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: object) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        for k in range(count):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_publish, args=(build, k, sender, drain), name=f"publisher-{k}")
            process.start()
            sender.close()
            processes.append(process)
            receivers.append(receiver)
        urls: list[str] = []
        for k, (process, receiver) in enumerate(zip(processes, receivers, strict=True)):
            ready = multiprocessing.connection.wait([receiver, process.sentinel], timeout=ready_timeout)
            message = receiver.recv() if receiver in ready and receiver.poll() else None
            if not isinstance(message, list):
                text = message if isinstance(message, str) else f"it ended with exit code {process.exitcode}"
                raise ConfigError(f"publisher {k} of {count} did not start: {text}")
            urls += message
            log.info("publisher %d of %d (pid %d) ready: %s", k, count, process.pid, " ".join(message))
        if announce is not None:
            announce(urls)
        failed = 0
        pending = list(processes)
        while pending:
            multiprocessing.connection.wait([process.sentinel for process in pending])
            for process in [process for process in pending if not process.is_alive()]:
                pending.remove(process)
                if process.exitcode != 0:
                    failed += 1
                    log.error(
                        "%s ended with exit code %s: stopping the others", process.name, process.exitcode
                    )
                    forward(signal.SIGTERM, None)
        return failed
    except BaseException:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)  # at once
        for process in processes:
            process.join(timeout=(drain or 0.0) + 30)
            if process.is_alive():
                process.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for receiver in receivers:
            receiver.close()


def _publish(build: Callable[[int], Server], k: int, sender: Any, drain: float | None) -> None:
    """A publisher process: build server ``k`` (a configuration error goes back to the parent as text), tell the
    parent its client URLs once listening, serve until the source ends or a signal stops it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_sigterm()  # not the parent's handler, which passes SIGTERM on to the publishers
    try:
        server = build(k)
    except TensorcomError as error:
        sender.send(str(error))
        sys.exit(error.exit_code)

    def ready(server: Server) -> None:
        sender.send(list(server.client_urls))
        sender.close()

    try:
        run_server(server, drain=drain, announce=ready)
    except KeyboardInterrupt:
        pass
