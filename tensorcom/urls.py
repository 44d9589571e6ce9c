"""tensorcom URLs: brace expansion and parsing into socket settings (no zmq import here).

A URL names the socket kind and whether it binds or connects; the transport follows ``+`` (``tcp`` by default)::

    zpush://host:7880            PUSH, connects          zpull://0.0.0.0:7880        PULL, binds
    zpub://0.0.0.0:7880          PUB, binds              zsub://host:7880            SUB, connects
    zrpush://0.0.0.0:7880        PUSH, binds             zrpull://host:7880          PULL, connects
    zrpub://host:7880            PUB, connects           zrsub://0.0.0.0:7880        SUB, binds
    zrep://0.0.0.0:7880          ROUTER, binds (server of the deterministic request protocol)
    zreq://host:7880             DEALER, connects (client of the deterministic request protocol)
    zpush+ipc:///tmp/socket      ipc transport           zsub+inproc://name          inproc transport

A PUB or SUB URL may carry ``?topic=NAME``: a publisher with a topic sends it as an extra first frame, and a
subscriber with a topic receives only that publisher's batches. Without it a SUB socket takes everything.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product
from urllib.parse import parse_qs

from tensorcom.errors import URLError

__all__ = ["PEER_SCHEMES", "SCHEMES", "ParsedURL", "expand_braces", "expand_urls", "parse_url", "peer_url"]

# scheme -> (socket type name, binds)
SCHEMES: dict[str, tuple[str, bool]] = {
    "zpush": ("PUSH", False),
    "zpull": ("PULL", True),
    "zpub": ("PUB", True),
    "zsub": ("SUB", False),
    "zrpush": ("PUSH", True),
    "zrpull": ("PULL", False),
    "zrpub": ("PUB", False),
    "zrsub": ("SUB", True),
    "zrep": ("ROUTER", True),
    "zreq": ("DEALER", False),
}
PEER_SCHEMES: dict[str, str] = {
    "zpush": "zpull",
    "zpull": "zpush",
    "zpub": "zsub",
    "zsub": "zpub",
    "zrpush": "zrpull",
    "zrpull": "zrpush",
    "zrpub": "zrsub",
    "zrsub": "zrpub",
    "zrep": "zreq",
    "zreq": "zrep",
}
"""The scheme of the other end of each scheme's socket (a client's URL for a server's, and the reverse)."""
TRANSPORTS = ("tcp", "ipc", "inproc")
_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_URL = re.compile(r"^(?P<scheme>[a-z]+)(?:\+(?P<transport>[a-z]+))?://(?P<rest>.*)$")
_MAX_EXPANSION = 100_000


@dataclass(frozen=True)
class ParsedURL:
    """What a tensorcom URL asks for: a socket type, bind or connect, and a zmq address."""

    url: str
    scheme: str
    socket_type: str
    bind: bool
    transport: str
    address: str
    topic: bytes = b""

    @property
    def is_request(self) -> bool:
        """True for the deterministic request protocol (zreq/zrep)."""
        return self.scheme in ("zreq", "zrep")


def _alternatives(body: str, text: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if step <= 0:
            raise URLError(f"{text!r}: range step must be > 0. Found: {step}")
        lo, hi = int(first), int(last)
        numbers = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        if len(numbers) > _MAX_EXPANSION:
            raise URLError(
                f"{text!r}: range {{{body}}} expands to {len(numbers)} items; at most {_MAX_EXPANSION}"
            )
        digits = (first.lstrip("-"), last.lstrip("-"))
        padded = any(len(d) > 1 and d.startswith("0") for d in digits)  # {00..10} pads, {0..10} does not
        width = max(len(d) for d in digits) if padded else 0
        return [str(n).zfill(width) for n in numbers]
    if "," in body:
        return body.split(",")
    raise URLError(f"{text!r}: brace group {{{body}}} must be a range like {{0..3}} or a list like {{a,b}}")


def expand_braces(text: str) -> list[str]:
    """Expand every ``{a,b}`` and ``{0..3}`` group (ranges may be zero-padded, ``{00..03}``, or stepped,
    ``{0..8..2}``); several groups expand to their product, left to right."""
    pieces: list[list[str]] = []
    position = 0
    while position < len(text):
        opening = text.find("{", position)
        closing = text.find("}", position)
        if opening < 0:
            if closing >= 0:
                raise URLError(f"{text!r}: unbalanced '}}' at position {closing}")
            pieces.append([text[position:]])
            break
        if 0 <= closing < opening:
            raise URLError(f"{text!r}: unbalanced '}}' at position {closing}")
        end = text.find("}", opening)
        if end < 0:
            raise URLError(f"{text!r}: unbalanced '{{' at position {opening}")
        nested = text.find("{", opening + 1)
        if 0 <= nested < end:
            raise URLError(f"{text!r}: nested braces are not supported (position {nested})")
        pieces.append([text[position:opening]])
        pieces.append(_alternatives(text[opening + 1 : end], text))
        position = end + 1
    total = 1
    for alternatives in pieces:
        total *= len(alternatives)
    if total > _MAX_EXPANSION:
        raise URLError(f"{text!r} expands to {total} items; at most {_MAX_EXPANSION}")
    return ["".join(combination) for combination in product(*pieces)] if pieces else [""]


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Expand braces in one URL, a whitespace-separated string of URLs, or a list of them."""
    items = urls.split() if isinstance(urls, str) else list(urls)
    result: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise URLError(f"URLs must be strings. Found: {item!r}")
        result.extend(expand_braces(item))
    if not result:
        raise URLError(f"no URL given. Found: {urls!r}")
    return result


def parse_url(url: str) -> ParsedURL:
    """Parse one (already expanded) tensorcom URL into socket settings."""
    match = _URL.match(url)
    if not match:
        raise URLError(
            f"{url!r} is not a tensorcom URL; expected SCHEME[+TRANSPORT]://ADDRESS, e.g. zpull://127.0.0.1:7880"
        )
    scheme, transport, rest = match.group("scheme"), match.group("transport") or "tcp", match.group("rest")
    if scheme not in SCHEMES:
        raise URLError(f"{url!r}: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if transport not in TRANSPORTS:
        raise URLError(f"{url!r}: unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
    socket_type, bind = SCHEMES[scheme]
    location, _, query = rest.partition("?")
    topic = b""
    if query:
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError as error:
            raise URLError(f"{url!r}: malformed query {query!r}") from error
        unknown = set(params) - {"topic"}
        if unknown:
            raise URLError(
                f"{url!r}: unknown query parameter(s) {', '.join(sorted(unknown))}; only 'topic' is known"
            )
        if "topic" in params:
            if socket_type not in ("SUB", "PUB"):
                raise URLError(
                    f"{url!r}: a topic only applies to PUB and SUB sockets (zpub, zsub, zrpub, zrsub)"
                )
            topic = params["topic"][-1].encode()
    if not location:
        raise URLError(f"{url!r}: missing address after '://'")
    if transport == "tcp":
        _check_tcp(url, location, bind)
    return ParsedURL(url, scheme, socket_type, bind, transport, f"{transport}://{location}", topic)


def _check_tcp(url: str, location: str, bind: bool) -> None:
    host, colon, port = location.rpartition(":")
    if not colon or not host:
        raise URLError(f"{url!r}: a tcp address needs HOST:PORT. Found: {location!r}")
    if "/" in location:
        raise URLError(f"{url!r}: a tcp address has no path. Found: {location!r}")
    if port == "*" and bind:
        return
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise URLError(
            f"{url!r}: port must be a number from 0 to 65535{' or *' if bind else ''}. Found: {port!r}"
        )
    if not bind and (int(port) == 0 or host in ("*", "0.0.0.0")):
        raise URLError(f"{url!r}: a connecting socket needs a concrete host and port. Found: {location!r}")


def peer_url(url: ParsedURL, address: str | None = None, host: str | None = None) -> str:
    """The URL the other end uses to reach the socket of ``url``: ``zrep://0.0.0.0:7880`` gives
    ``zreq://HOST:7880``, ``zrpush+ipc:///tmp/s`` gives ``zrpull+ipc:///tmp/s``, ``zpub://...?topic=a`` gives
    ``zsub://...?topic=a``.

    ``address`` is the zmq address the socket really bound (read back, so port 0 shows its port; default: the
    URL's own). A wildcard host is replaced by ``host`` (default: this machine's name, or 127.0.0.1 when that
    name does not resolve), since nothing can connect to 0.0.0.0.
    """
    scheme = PEER_SCHEMES[url.scheme]
    transport, _, location = (address or url.address).partition("://")
    if transport == "tcp":
        bound_host, _, port = location.rpartition(":")
        if bound_host in _WILDCARD_HOSTS:
            location = f"{host or _this_host()}:{port}"
    prefix = scheme if transport == "tcp" else f"{scheme}+{transport}"
    query = f"?topic={url.topic.decode()}" if url.topic else ""
    return f"{prefix}://{location}{query}"


def _this_host() -> str:
    name = socket.gethostname()
    try:
        socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"
    return name
