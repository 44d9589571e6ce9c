"""URL brace expansion and parsing into socket settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorcom import URLError, expand_urls, parse_url
from tensorcom.urls import expand_braces

EXPANSIONS = {
    "plain": ("zsub://h:7880", ["zsub://h:7880"]),
    "range": ("zsub://h:788{0..3}", ["zsub://h:7880", "zsub://h:7881", "zsub://h:7882", "zsub://h:7883"]),
    "list": ("zsub://{a,b}:1", ["zsub://a:1", "zsub://b:1"]),
    "zero-padded": ("f{00..03}", ["f00", "f01", "f02", "f03"]),
    "descending": ("{3..1}", ["3", "2", "1"]),
    "stepped": ("{0..6..3}", ["0", "3", "6"]),
    "two-groups": ("{a,b}{1..2}", ["a1", "a2", "b1", "b2"]),
    "groups-apart": (
        "zsub://n{1,2}:78{8..9}0",
        ["zsub://n1:7880", "zsub://n1:7890", "zsub://n2:7880", "zsub://n2:7890"],
    ),
    "empty-alternative": ("x{,y}", ["x", "xy"]),
}


@pytest.mark.parametrize("text, expected", EXPANSIONS.values(), ids=EXPANSIONS.keys())
def test_brace_expansion(text: str, expected: list[str]) -> None:
    """Ranges, lists, padding, steps and several groups expand like the shell, left to right."""
    assert expand_braces(text) == expected


def test_expand_urls_takes_strings_and_lists() -> None:
    """A whitespace-separated string and a list of URLs both expand every item."""
    assert expand_urls("zsub://a:{1,2} zsub://b:3") == ["zsub://a:1", "zsub://a:2", "zsub://b:3"]
    assert expand_urls(["zsub://a:{1..2}", "zsub://b:3"]) == ["zsub://a:1", "zsub://a:2", "zsub://b:3"]


BAD_BRACES = {
    "unclosed": ("zsub://h:788{0..3", "unbalanced '{'"),
    "stray-close": ("zsub://h:7880}", "unbalanced '}'"),
    "nested": ("{a,{b,c}}", "nested braces"),
    "not-a-group": ("{abc}", "must be a range"),
    "zero-step": ("{0..4..0}", "step must be > 0"),
    "too-many": ("{0..999999}", "at most"),
}


@pytest.mark.parametrize("text, message", BAD_BRACES.values(), ids=BAD_BRACES.keys())
def test_bad_braces_raise_url_error_quoting_the_url(text: str, message: str) -> None:
    """Malformed brace groups raise URLError (a ValueError) that quotes the text."""
    with pytest.raises(URLError, match=message) as raised:
        expand_urls(text)
    assert repr(text) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_empty_url_list_is_an_error() -> None:
    """Expanding nothing is an error rather than a connection to nowhere."""
    with pytest.raises(URLError, match="no URL given"):
        expand_urls([])


@given(st.lists(st.text(alphabet="abcxyz019", min_size=1, max_size=4), min_size=1, max_size=5, unique=True))
def test_list_groups_expand_to_their_items(items: list[str]) -> None:
    """A {x,y,...} group expands to exactly its items in order, with prefix and suffix kept."""
    if len(items) == 1:
        items = [*items, items[0] + "z"]
    assert expand_braces("p{" + ",".join(items) + "}s") == [f"p{i}s" for i in items]


@given(st.integers(0, 500), st.integers(0, 40))
def test_ranges_expand_to_every_number(start: int, length: int) -> None:
    """{a..b} yields every integer from a to b inclusive."""
    assert expand_braces(f"{{{start}..{start + length}}}") == [
        str(n) for n in range(start, start + length + 1)
    ]


PARSED = {
    "zpush": ("zpush://host:7880", "PUSH", False, "tcp://host:7880"),
    "zpull": ("zpull://0.0.0.0:7880", "PULL", True, "tcp://0.0.0.0:7880"),
    "zpub": ("zpub://*:7880", "PUB", True, "tcp://*:7880"),
    "zsub": ("zsub://host:7880", "SUB", False, "tcp://host:7880"),
    "zrpush": ("zrpush://127.0.0.1:0", "PUSH", True, "tcp://127.0.0.1:0"),
    "zrpull": ("zrpull://host:1", "PULL", False, "tcp://host:1"),
    "zrpub": ("zrpub://host:1", "PUB", False, "tcp://host:1"),
    "zrsub": ("zrsub://127.0.0.1:*", "SUB", True, "tcp://127.0.0.1:*"),
    "zrep": ("zrep://0.0.0.0:7880", "ROUTER", True, "tcp://0.0.0.0:7880"),
    "zreq": ("zreq://host:7880", "DEALER", False, "tcp://host:7880"),
    "ipc": ("zpush+ipc:///tmp/x.sock", "PUSH", False, "ipc:///tmp/x.sock"),
    "inproc": ("zsub+inproc://name", "SUB", False, "inproc://name"),
    "explicit-tcp": ("zpull+tcp://127.0.0.1:5", "PULL", True, "tcp://127.0.0.1:5"),
}


@pytest.mark.parametrize("url, socket_type, bind, address", PARSED.values(), ids=PARSED.keys())
def test_parse_url(url: str, socket_type: str, bind: bool, address: str) -> None:
    """Each scheme maps to its socket type and direction, and the transport to a zmq address."""
    parsed = parse_url(url)
    assert (parsed.socket_type, parsed.bind, parsed.address, parsed.url) == (socket_type, bind, address, url)
    assert parsed.is_request == (parsed.scheme in ("zreq", "zrep"))


def test_sub_topic_from_query() -> None:
    """A SUB URL's ?topic= sets the subscription; without it the socket takes everything."""
    assert parse_url("zsub://h:1?topic=train").topic == b"train"
    assert parse_url("zsub://h:1").topic == b""


BAD_URLS = {
    "no-scheme": ("127.0.0.1:7880", "not a tensorcom URL"),
    "unknown-scheme": ("http://host:80", "unknown scheme 'http'"),
    "unknown-transport": ("zpush+udp://h:1", "unknown transport 'udp'"),
    "no-port": ("zpush://host", "needs HOST:PORT"),
    "bad-port": ("zpush://host:http", "port must be a number"),
    "port-too-large": ("zpull://host:70000", "port must be a number"),
    "connect-to-wildcard": ("zpush://*:7880", "concrete host and port"),
    "connect-to-port-zero": ("zsub://host:0", "concrete host and port"),
    "path-on-tcp": ("zpush://host:1/path", "no path"),
    "empty-address": ("zpush+ipc://", "missing address"),
    "unknown-query": ("zsub://h:1?hwm=3", "unknown query parameter"),
    "topic-on-push": ("zpush://h:1?topic=a", "only applies to PUB and SUB"),
}


@pytest.mark.parametrize("url, message", BAD_URLS.values(), ids=BAD_URLS.keys())
def test_bad_urls_raise_url_error_quoting_the_url(url: str, message: str) -> None:
    """Each malformed URL raises URLError quoting it and saying what is wrong."""
    with pytest.raises(URLError, match=message) as raised:
        parse_url(url)
    assert repr(url) in str(raised.value)
