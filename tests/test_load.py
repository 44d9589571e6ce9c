"""Load: one request server, 16 concurrent zreq clients (threads) for a bounded time.

Promises checked: every client receives its own exact stream; the server shares itself fairly (the slowest of the
16 clients gets at least half the rate of the fastest); the server's memory stays bounded; and a slow client does
not slow the others (their rate with a slow client among them stays at least 80% of their rate without one).

All clients of a phase connect first and start together, so every rate is measured over the same window; the two
phases alternate in short rounds, so a change in the machine's other load affects both alike. The `slow` variant
runs a minute per phase (`make test-slow`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import factories
import pytest
from helpers import StartProcess, rss_kib, serve
from reliability import record

from tensorcom import Connection

CLIENTS = 16
FAIRNESS = 0.5
SLOW_CLIENT_SHARE = 0.8
RSS_GROWTH_KIB = 60_000
NBYTES = 16384


def digest(batch: Any) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    for array in batch:
        hasher.update(str(array.dtype).encode() + str(array.shape).encode())
        hasher.update(array.tobytes())
    return hasher.digest()


def expected_digests(seed: int, count: int) -> list[bytes]:
    with factories.big(seed=seed, rank=0, world_size=1, nbytes=NBYTES) as pipeline:
        return [digest(next(pipeline)) for _ in range(count)]


class Client(threading.Thread):
    """One rank: connects, waits for the others, then receives its stream until told to stop, keeping a digest of
    every batch."""

    def __init__(
        self, url: str, seed: int, pause: float, start: threading.Barrier, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.seed, self.pause, self.start_together, self.stop = url, seed, pause, start, stop
        self.digests: list[bytes] = []
        self.error: BaseException | None = None
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return len(self.digests) / self.seconds if self.seconds else 0.0

    def run(self) -> None:
        try:
            with Connection(self.url, seed=self.seed, timeout=30, prefetch=4) as connection:
                self.start_together.wait(timeout=60)
                started = time.monotonic()
                while not self.stop.is_set():
                    self.digests.append(digest(connection.recv()))
                    if self.pause:
                        time.sleep(self.pause)
                self.seconds = time.monotonic() - started
        except BaseException as error:  # reported by the test
            self.error = error
            self.start_together.abort()


def run_phase(url: str, seconds: float, pauses: list[float], first_seed: int) -> list[Client]:
    """Run one client per pause for ``seconds`` after all have connected; check every stream is exact."""
    start = threading.Barrier(len(pauses) + 1)
    stop = threading.Event()
    clients = [Client(url, first_seed + index, pause, start, stop) for index, pause in enumerate(pauses)]
    for client in clients:
        client.start()
    start.wait(timeout=60)
    time.sleep(seconds)
    stop.set()
    for client in clients:
        client.join(timeout=60)
    assert [client.error for client in clients] == [None] * len(clients)
    for client in clients:
        assert client.digests == expected_digests(client.seed, len(client.digests)), (
            f"client with seed {client.seed} did not get its exact stream"
        )
    return clients


def run_load(start_process: StartProcess, seconds: float, rounds: int = 2) -> dict[str, Any]:
    process, url = serve(start_process, "factories:big", "-o", f"nbytes={NBYTES}", workers=2)
    run_phase(url, 1.0, [0.0] * CLIENTS, first_seed=1000)  # warm-up: workers and pipelines exist
    rss_before = rss_kib(process.pid)
    fair: list[Client] = []
    mixed: list[Client] = []
    for index in range(rounds):  # alternate, so that the machine's other load weighs on both phases alike
        fair += run_phase(url, seconds / rounds, [0.0] * CLIENTS, first_seed=100 * index)
        mixed += run_phase(url, seconds / rounds, [0.0] * (CLIENTS - 1) + [0.05], first_seed=100 * index + 50)
    rss_after = rss_kib(process.pid)
    fast = [client for client in mixed if not client.pause]
    fair_rate = sum(len(c.digests) for c in fair) / sum(c.seconds for c in fair)
    fast_rate = sum(len(c.digests) for c in fast) / sum(c.seconds for c in fast)
    ratios = [min(c.rate for c in fair[i : i + CLIENTS]) / max(c.rate for c in fair[i : i + CLIENTS])
              for i in range(0, len(fair), CLIENTS)]  # fmt: skip
    figures = {
        "clients": CLIENTS,
        "seconds_per_phase": seconds,
        "batches": sum(len(client.digests) for client in fair + mixed),
        "lost": 0,
        "min_max_ratio": round(min(ratios), 3),
        "per_client_batches_per_s": round(fair_rate, 1),
        "with_slow_client_batches_per_s": round(fast_rate, 1),
        "slow_client_batches": sum(len(client.digests) for client in mixed if client.pause),
        "server_rss_kib": [rss_before, rss_after],
    }
    assert min(ratios) >= FAIRNESS, f"unfair shares: {figures}"
    assert fast_rate >= SLOW_CLIENT_SHARE * fair_rate, figures
    assert rss_after - rss_before < RSS_GROWTH_KIB, figures
    assert process.poll() is None
    return figures


def test_sixteen_clients_get_exact_fair_streams_with_bounded_memory(start_process: StartProcess) -> None:
    """16 clients for 4 s, and 15 plus a slow one for 4 s, in alternating rounds: exact streams, fair shares, flat
    server memory, and the slow client costs the others nothing beyond its share."""
    record("load", **run_load(start_process, 4.0))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sixteen_clients_get_exact_fair_streams_with_bounded_memory_long(start_process: StartProcess) -> None:
    """The same for a minute per phase."""
    record("load-long", **run_load(start_process, 60.0, rounds=4))
