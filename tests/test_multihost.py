"""tensorcom across hosts: servers and clients in separate network namespaces with their own addresses.

Each test builds its hosts with :mod:`netns` (root and iproute2 needed; skipped with the reason otherwise), runs
``tensorcom serve`` and ``serve-synthetic`` in some and ``netns_client.py`` in others, and cuts links with
``ip link set ... down`` to take a host off the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import factories
import netns
import pytest
from helpers import environment, serve_args, wait_ready
from netns_client import digest

from tensorcom._net import security
from tensorcom.client.request import _GROUP

TESTS = Path(__file__).parent
CLIENT = str(TESTS / "netns_client.py")
PORT = 7880
PUB_PORT = 7890
PREFETCH = 4
WINDOW = PREFETCH * _GROUP  # steps a client asks for beyond the one it delivers (small batches: 4 a request)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[netns.Network]:
    """An empty test network (add hosts with ``add_host``); everything in it is removed afterwards."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns.remove_leftovers()
    with netns.Network(logs=tmp_path) as network:
        yield network
    assert netns.leftovers(network.tag) == ([], "")


def start_server(
    network: netns.Network, host: netns.Host, factory: str, *options: str
) -> tuple[netns.Process, str]:
    """``tensorcom serve FACTORY`` on ``host``, listening on all its addresses; returns it and its zreq URL."""
    pairs = [word for option in options for word in ("-o", option)]
    process = network.start(
        host, *serve_args(factory, *pairs, bind=f"zrep://0.0.0.0:{PORT}"), env=environment()
    )
    wait_ready(process.popen)
    return process, f"zreq://{host.address}:{PORT}"


def start_client(network: netns.Network, host: netns.Host, *args: str) -> netns.Process:
    return network.start(host, CLIENT, *args, stdin=True, env=environment())


def server_name(process: netns.Process) -> str:
    """The name a zreq server puts in its replies ends with its pid (namespaces share the pid space)."""
    return f":{process.pid}"


def reference(factory: Any, count: int | None = None, **config: Any) -> list[tuple[str, list[int]]]:
    """Digest and labels of each batch of the factory's pipeline, computed in this process."""
    found = []
    with factory(**config) as pipeline:
        for batch in pipeline:
            found.append((digest(batch), batch[1].tolist()))
            if len(found) == count:
                break
    return found


def read_until_pause(client: netns.Process, records: list[dict[str, Any]], timeout: float = 30.0) -> int:
    """Collect the client's batch records into ``records`` until it pauses; return the batch it paused after."""
    for record in client.records(timeout):
        if "paused" in record:
            return int(record["paused"])
        records.append(record)
    raise AssertionError(f"client ended without pausing; its log:\n{client.stderr()}")


def served_by(records: list[dict[str, Any]], server: netns.Process) -> list[int]:
    return [
        record["step"]
        for record in records
        if "batch" in record and record["server"].endswith(server_name(server))
    ]


def test_harness_removes_hosts_and_links_even_when_the_test_fails(tmp_path: Path) -> None:
    """Namespaces, veth pairs and the bridge are gone after an exception inside the network's block."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="a failing test"):
        with netns.Network(logs=tmp_path) as network:
            host = network.add_host("a")
            network.add_host("b")
            network.start(host, "-c", "import time; time.sleep(60)")
            assert set(netns.namespaces()) >= {network.switch, host.namespace}
            raise RuntimeError("a failing test")
    assert netns.leftovers(network.tag) == ([], "")
    assert network.processes[0].poll() is not None


def test_two_server_hosts_give_a_third_host_the_in_process_stream(network: netns.Network) -> None:
    """Servers on two hosts, a rank on a third: every batch bit-identical to the pipeline run in process."""
    first, second, trainer = (network.add_host(name) for name in ("data0", "data1", "trainer"))
    servers = [start_server(network, host, "factories:small", "n=200") for host in (first, second)]
    client = start_client(
        network, trainer, *(url for _, url in servers), "--seed=7", "--rank=1", "--world-size=2"
    )
    records = list(client.records(timeout=30))
    assert records[-1] == {"done": 25}, client.stderr()
    batches = records[:-1]
    expected = reference(factories.small, seed=7, rank=1, world_size=2, n=200)
    assert [(r["digest"], r["labels"]) for r in batches] == expected
    assert [r["step"] for r in batches] == list(range(25))
    assert all(served_by(batches, process) for process, _ in servers), "both servers answer"


def test_a_server_host_cut_off_mid_epoch_fails_over_and_is_used_again_when_back(
    network: netns.Network,
) -> None:
    """Link down: its steps go to the other server, nothing lost or repeated; link up: it serves again."""
    cut_at, restore_at, count = 10, 40, 300
    victim_host, survivor_host, trainer = (network.add_host(name) for name in ("data0", "data1", "trainer"))
    victim, victim_url = start_server(network, victim_host, "factories:big", "nbytes=4096", "delay=0.01")
    survivor, survivor_url = start_server(
        network, survivor_host, "factories:big", "nbytes=4096", "delay=0.01"
    )
    client = start_client(
        network,
        trainer,
        victim_url,
        survivor_url,
        "--seed=2",
        f"--count={count}",
        f"--prefetch={PREFETCH}",
        f"--pause-at={cut_at}",
        f"--pause-at={restore_at}",
    )
    records: list[dict[str, Any]] = []
    assert read_until_pause(client, records) == cut_at
    network.cut(victim_host)
    client.send()
    assert read_until_pause(client, records) == restore_at
    network.restore(victim_host)
    client.send()
    records += client.records(timeout=30)
    assert records[-1] == {"done": count}, client.stderr()
    batches = records[:-1]
    expected = reference(factories.big, count=count, seed=2, rank=0, world_size=1, nbytes=4096)
    assert [r["step"] for r in batches] == list(range(count))
    assert [(r["digest"], r["labels"]) for r in batches] == expected
    before, during, after = (
        served_by([r for r in batches if low <= r["step"] < high], victim)
        for low, high in (
            (0, cut_at + 1),
            (cut_at + WINDOW + 1, restore_at + 1),
            (restore_at + 1, count),
        )
    )
    assert before, "the victim served before its link was cut"
    assert during == [], "nothing requested after the cut came from the host that was cut off"
    assert after, f"the victim was used again once its link was back; its log:\n{victim.stderr()}"
    assert served_by(batches, survivor)


def test_every_server_host_cut_off_raises_timeout_naming_the_endpoints(network: netns.Network) -> None:
    """With both server hosts unreachable the client's recv raises Timeout listing both addresses."""
    hosts = [network.add_host(name) for name in ("data0", "data1", "trainer")]
    servers = [start_server(network, host, "factories:small", "repeating=true") for host in hosts[:2]]
    client = start_client(
        network,
        hosts[2],
        *(url for _, url in servers),
        "--timeout-after-pause=2",  # the start-up before the pause has the default 30 s
        "--pause-at=3",
        "--count=1000",
    )
    records: list[dict[str, Any]] = []
    read_until_pause(client, records)
    for host in hosts[:2]:
        network.cut(host)
    client.send()
    records += client.records(timeout=30)
    final = records[-1]
    assert final.get("error") == "Timeout", final
    assert (
        f"{hosts[0].address}:{PORT}" in final["message"] and f"{hosts[1].address}:{PORT}" in final["message"]
    )
    assert "(down)" in final["message"]
    assert client.wait(timeout=10) == 4


def test_a_pub_stream_is_shared_by_client_hosts_of_two_jobs(network: netns.Network) -> None:
    """Two jobs on two hosts subscribe to one publisher: each gets consecutive batches, the same bytes for each."""
    publisher, job0, job1 = (network.add_host(name) for name in ("data0", "job0", "job1"))
    url = f"zsub://{publisher.address}:{PUB_PORT}"
    clients = [
        start_client(network, host, url, "--count=60", "--sleep=0.02", "--announce") for host in (job0, job1)
    ]
    for client in clients:  # both subscribe before the publisher starts, however long their start-up takes
        assert next(client.records(timeout=60)) == {"connected": True}, client.stderr()
    network.start(
        publisher,
        "-m",
        "tensorcom_servers.synthetic",
        "-q",
        "-b",
        "4",
        "--size",
        "224",
        f"zpub://0.0.0.0:{PUB_PORT}",
    )
    streams = []
    for client in clients:
        records = list(client.records(timeout=30))
        assert records[-1] == {"done": 60}, client.stderr()
        streams.append({r["labels"][0]: r["digest"] for r in records[:-1]})
        firsts = [r["labels"][0] for r in records[:-1]]
        assert all((b - a) % 1000 == 4 for a, b in zip(firsts[:-1], firsts[1:], strict=True)), (
            "consecutive batches, none dropped"
        )
    shared = streams[0].keys() & streams[1].keys()
    assert len(shared) >= 20, f"the jobs saw {len(shared)} batches in common"
    assert all(streams[0][label] == streams[1][label] for label in shared)


def test_curve_keys_from_the_environment_work_across_hosts(network: netns.Network, tmp_path: Path) -> None:
    """Keys given only by the TENSORCOM_* variables (as the deploy recipes do): a keyed client gets the stream."""
    keys = tmp_path / "keys"
    security.generate_keys(keys, ["trainer"])
    data, trainer = network.add_host("data0"), network.add_host("trainer")
    server_env = {
        **environment(),
        security.SERVER_KEY_ENV: str(keys / "server.key_secret"),
        security.CLIENT_KEYS_ENV: str(keys / "clients"),
    }
    args = serve_args("factories:small", bind=f"zrep://0.0.0.0:{PORT}", workers=0)
    wait_ready(network.start(data, *args, env=server_env).popen)
    client_env = {
        **environment(),
        security.CLIENT_KEY_ENV: str(keys / "trainer.key_secret"),
        security.SERVER_PUBLIC_KEY_ENV: str(keys / "server.key"),
    }
    client = network.start(trainer, CLIENT, f"zreq://{data.address}:{PORT}", "--seed=5", env=client_env)
    records = list(client.records(timeout=30))
    assert records[-1] == {"done": 15}, client.stderr()
    assert [(r["digest"], r["labels"]) for r in records[:-1]] == reference(
        factories.small, seed=5, rank=0, world_size=1
    )


@pytest.mark.parametrize(
    "platform, ip_path, uid, reason",
    [
        ("darwin", "/usr/sbin/ip", 0, "need Linux"),
        ("linux", None, 0, "iproute2's `ip` is not installed"),
        ("linux", "/usr/sbin/ip", 1000, "needs root; running as uid 1000"),
    ],
    ids=["not-linux", "no-iproute2", "not-root"],
)
def test_hosts_are_skipped_with_the_reason_where_they_cannot_be_built(
    monkeypatch: pytest.MonkeyPatch, platform: str, ip_path: str | None, uid: int, reason: str
) -> None:
    """Without Linux, iproute2 or root, the harness names what is missing (the tests skip with it)."""
    netns.unavailable.cache_clear()
    monkeypatch.setattr(netns.sys, "platform", platform)
    monkeypatch.setattr(netns.shutil, "which", lambda name: ip_path)
    monkeypatch.setattr(netns.os, "geteuid", lambda: uid)
    try:
        assert reason in (netns.unavailable() or "")
    finally:
        netns.unavailable.cache_clear()
