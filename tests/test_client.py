"""tensorcom.client: Connection picks the kind of client by scheme, each kind takes only its own options, and the
client modules import each other in one direction only."""

from __future__ import annotations

import ast
import inspect
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tensorcom.client
from tensorcom import ConfigError, Connection, Timeout, URLError
from tensorcom.client import RequestConnection, StreamConnection

StartServer = Callable[..., tuple[subprocess.Popen[bytes], str]]
CLIENT = Path(tensorcom.client.__file__).parent


def test_a_stream_url_builds_a_stream_connection() -> None:
    """Connection('zpull://...') is a StreamConnection and a Connection, and takes the stream options."""
    with Connection("zpull://127.0.0.1:0", timeout=1, queue=4, on_malformed="log") as connection:
        assert type(connection) is StreamConnection
        assert isinstance(connection, Connection)
        assert connection.on_malformed == "log"


def test_a_zreq_url_builds_a_request_connection(request_server: StartServer) -> None:
    """Connection('zreq://...', seed=...) is a RequestConnection and a Connection, and takes the zreq options."""
    _, url = request_server("factories:small")
    with Connection(url, seed=3, prefetch=2, timeout=30) as connection:
        assert type(connection) is RequestConnection
        assert isinstance(connection, Connection)
        assert (connection.seed, connection.prefetch) == (3, 2)
        assert connection.recv() is not None


@pytest.mark.parametrize(
    "url, options, message",
    [
        (
            "zsub://127.0.0.1:7880",
            {"seed": 1},
            "seed= is an option of zreq:// URLs (deterministic request mode); zsub://127.0.0.1:7880 is a stream URL",
        ),
        (
            "zpull://127.0.0.1:1",
            {"seed": 3, "prefetch": 8, "timeout": 1},
            "seed=, prefetch= are options of zreq:// URLs (deterministic request mode); "
            "zpull://127.0.0.1:1 is a stream URL",
        ),
        (
            "zreq://127.0.0.1:1",
            {"queue": 32},
            "queue= is an option of zpull://, zrpull://, zsub://, zrsub:// URLs (stream mode); "
            "zreq://127.0.0.1:1 is a deterministic request URL",
        ),
        (
            "zpull://127.0.0.1:1",
            {"state": None},
            "state= is an option of zreq:// URLs (deterministic request mode); zpull://127.0.0.1:1 is a stream URL",
        ),
    ],
    ids=["seed-on-stream", "two-on-stream", "queue-on-zreq", "given-as-none"],
)
def test_an_option_of_the_other_kind_is_refused_by_name(
    url: str, options: dict[str, Any], message: str
) -> None:
    """An option of the other kind (even given as None) raises a one-line ConfigError naming it, the scheme that
    takes it, and the URL."""
    with pytest.raises(ConfigError) as raised:
        Connection(url, **options)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", [Connection, StreamConnection, RequestConnection], ids=lambda k: k.__name__)
def test_an_unknown_option_is_a_type_error(kind: Any) -> None:
    """A misspelt option raises TypeError naming it, whichever class is called."""
    url = "zreq://127.0.0.1:1" if kind is RequestConnection else "zpull://127.0.0.1:1"
    with pytest.raises(TypeError, match="prefech"):
        kind(url, prefech=8)


@pytest.mark.parametrize(
    "kind, url, message",
    [
        (Connection, "zpush://127.0.0.1:5", "a Connection cannot use a zpush (PUSH) socket"),
        (Connection, "zrep://127.0.0.1:5", "a Connection cannot use a zrep (ROUTER) socket"),
        (
            Connection,
            "zreq://127.0.0.1:5 zsub://127.0.0.1:6",
            "'zreq://127.0.0.1:5' is a deterministic request URL and 'zsub://127.0.0.1:6' a stream URL",
        ),
        (StreamConnection, "zreq://127.0.0.1:5", "a StreamConnection receives zpull://"),
        (RequestConnection, "zsub://127.0.0.1:5", "a RequestConnection receives zreq:// URLs"),
    ],
    ids=["sending", "server", "mixed", "zreq-to-stream", "stream-to-zreq"],
)
def test_urls_no_kind_of_connection_takes_are_refused(kind: Any, url: str, message: str) -> None:
    """A server's scheme, a mix of stream and zreq URLs, or a URL of the other kind raises URLError saying so."""
    with pytest.raises(URLError) as raised:
        kind(url)
    assert message in str(raised.value)


def test_connection_lists_exactly_the_options_of_both_kinds() -> None:
    """Connection's typed signature (what type checkers see) is the union of the two kinds' options, all keyword-only."""
    parameters = inspect.signature(Connection).parameters
    union = set(inspect.signature(StreamConnection).parameters) | set(
        inspect.signature(RequestConnection).parameters
    )
    assert set(parameters) == union
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in parameters.items() if name != "urls")


def test_type_checkers_check_each_kind_against_its_own_options(tmp_path: Path) -> None:
    """mypy accepts each class with its own options and flags the other kind's options on StreamConnection and
    RequestConnection, and a misspelt one on Connection."""
    from mypy import api

    usage = tmp_path / "usage.py"
    usage.write_text(
        "from tensorcom.client import Connection, RequestConnection, StreamConnection\n"
        "a = StreamConnection('zpull://h:7880', queue=32, on_malformed='log', timeout=None)\n"
        "b = RequestConnection('zreq://h:7880', seed=17, prefetch=8, heartbeat=0.5)\n"
        "c = StreamConnection('zpull://h:7880', seed=17)\n"
        "d = RequestConnection('zreq://h:7880', queue=32)\n"
        "e = Connection('zreq://h:7880', seed=17, queue=32)\n"
        "f = Connection('zreq://h:7880', seed='17')\n"
        "reveal_type(a)\n"
        "reveal_type(e)\n"
    )
    report, _, status = api.run([str(usage)])
    assert status == 1
    lines = [
        line.split("usage.py:", 1)[-1]
        for line in report.splitlines()
        if "usage.py:" in line and " defined in " not in line
    ]
    assert lines == [
        '4: error: Unexpected keyword argument "seed" for "StreamConnection"  [call-arg]',
        '5: error: Unexpected keyword argument "queue" for "RequestConnection"  [call-arg]',
        '7: error: Argument "seed" to "Connection" has incompatible type "str"; expected "int"  [arg-type]',
        '8: note: Revealed type is "tensorcom.client.stream.StreamConnection"',
        '9: note: Revealed type is "tensorcom.client._base.Connection"',
    ]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_client_modules_import_each_other_in_one_direction() -> None:
    """_base imports neither kind, and neither kind imports the other, even inside a function: no import cycle."""
    assert not _imports(CLIENT / "_base.py") & {"tensorcom.client.stream", "tensorcom.client.request"}
    assert "tensorcom.client.request" not in _imports(CLIENT / "stream.py")
    assert "tensorcom.client.stream" not in _imports(CLIENT / "request.py")
    assert _imports(CLIENT / "__init__.py") >= {"tensorcom.client.stream", "tensorcom.client.request"}


def test_old_import_paths_still_work() -> None:
    """Names that lived in client/stream.py before the base existed import from their old places, and both kinds
    are public names of tensorcom."""
    import tensorcom
    from tensorcom.client.request import RequestConnection as Request
    from tensorcom.client.request import default_rank_and_world_size
    from tensorcom.client.stream import BatchInfo
    from tensorcom.client.stream import Connection as StreamModuleConnection

    assert StreamModuleConnection is tensorcom.Connection is Connection
    assert BatchInfo is tensorcom.BatchInfo
    assert Request is RequestConnection
    assert default_rank_and_world_size is tensorcom.client.default_rank_and_world_size
    assert (tensorcom.StreamConnection, tensorcom.RequestConnection) == (StreamConnection, RequestConnection)


def _unused_port() -> int:
    """A port nothing listens on: bound to find a free one, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_timeout_names_the_servers_that_never_answered(request_server: StartServer) -> None:
    """With a real server and an address where nothing listens, a Timeout says the dead one never answered and the
    real one is up or down, not that the dead one is up."""
    dead = _unused_port()
    process, url = request_server("factories:small", "repeating=true")
    live = url.rsplit(":", 1)[1]
    urls = [url, f"zreq://127.0.0.1:{dead}"]
    with Connection(urls, seed=1, timeout=30, heartbeat=0.2, prefetch=1) as connection:
        connection.recv()  # the server and its worker are up: their start-up is not timed
        process.kill()
        process.wait(timeout=10)
        connection.timeout = 2
        with pytest.raises(Timeout) as raised:
            for _ in range(100):  # batches already prefetched may still arrive first
                connection.recv()
    text = str(raised.value)
    assert f"127.0.0.1:{dead} (never answered)" in text
    assert f"127.0.0.1:{live} (up)" in text or f"127.0.0.1:{live} (down)" in text


def test_no_answer_at_all_names_every_server_as_never_answered() -> None:
    """When no server answers the greeting, the Timeout lists each address as never answered."""
    ports = [_unused_port(), _unused_port()]
    with pytest.raises(Timeout) as raised:
        Connection([f"zreq://127.0.0.1:{port}" for port in ports], timeout=1)
    assert all(f"127.0.0.1:{port} (never answered)" in str(raised.value) for port in ports)
