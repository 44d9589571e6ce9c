"""tensorcom 0.1's ``zcom`` module: its ``Connection`` and helpers, as a thin face over this project's client and server.

A program written for tensorcom 0.1 keeps ``from tensorcom import zcom`` (or ``from tensorcom.zcom import
Connection``); one that did ``import tensorcom`` and ``tensorcom.Connection(...)`` changes only that line, to
``import tensorcom.zcom as tensorcom`` (``tensorcom.Connection`` itself is this project's client, with its own
semantics). Underneath, receiving is a :class:`tensorcom.StreamConnection` and sending a
:class:`tensorcom.StreamServer` (one-frame messages go through the same socket layer), so a 0.1 program gets bounded
queues, zero-copy decoding, the shared-memory path on one host, CURVE keys from ``TENSORCOM_*`` variables, and brace
expansion as :mod:`tensorcom.urls` does it; it sees a batch as 0.1 did, a list of arrays, whatever the server
appends (our servers' stream metadata is left out).

Kept as in 0.1:

- Iterating never ends on its own: ``epoch`` is only what ``len()`` answers. ``recv()`` waits forever by default.
- ``device=`` and ``raw=`` are accepted and ignored (arrays stay numpy unless ``converters`` say otherwise).
- ``converters="torch"`` is 0.1's :func:`totorch`: images move to channels-first, floats become float32, 16- to
  64-bit integers int64; ``batch_transforms`` then ``converters`` apply per position, wrapping around.
- Sending refuses 64-bit arrays (float64, int64, uint64) unless ``allow64``; uint32 works now (0.1's typo broke it).
- ``infos`` given as a list label sent headers and are required of received ones (a mismatch raises
  :class:`tensorcom.tenbin.TenbinDecodeError` where 0.1 asserted).

Deliberate differences from 0.1:

- Every socket is bounded: ``queue`` batches (default 2) per socket and peer, where 0.1 let ZMQ queue 1000.
- Every URL is used with the socket its scheme names: 0.1 opened one socket, of the first URL's kind, for all of
  them. Several ``zpush``/``zrpush`` URLs get batches in turn (0.1's one PUSH socket skipped a full peer, ours waits
  for it); ``zpub`` URLs each get every batch. Sending and receiving URLs cannot be mixed, and ``zreq``/``zrep`` are
  :class:`tensorcom.Connection`'s. ``connect()`` also expands braces (0.1 expanded them in the constructor only);
  ``noexpand=True`` refuses a URL with braces rather than pass them to ZMQ.
- Sockets open in ``connect()`` (the constructor's URLs included), as in 0.1; a second ``connect()`` reopens them
  with every URL given so far (batches already queued on the old ones are dropped). Options are read then: set
  attributes such as ``infos`` or ``multipart`` through the constructor.
- A publisher (``zpub``, ``zrpub``) waits for its first subscriber and is slowed by a slow one instead of dropping
  batches (XPUB_NODROP); one-frame messages (``multipart=False``) go on a plain PUB socket, as in 0.1.
- ``recv()`` logs a warning every :data:`WAIT_LOG_SECONDS` seconds while it waits, naming the endpoints;
  ``timeout=`` (ours) makes it raise :class:`tensorcom.Timeout` instead, and bounds ``send()`` the same way.
- ``close()`` gives queued batches up to ``linger`` seconds (ours, default 5) to leave; 0.1 dropped them at once.
  Large arrays are sent in place, not copied: do not modify an array after sending it (0.1 copied it).
- ``total=`` stops iteration after that many samples (0.1 documented it, but its counter never advanced).
- ``stats`` counts received batches too (0.1 counted only sent ones), and :meth:`Statistics.rate` and
  :meth:`Statistics.throughput` work (0.1's called an undefined ``old_div``). Reports (``report=``) go to
  ``logging`` at INFO, not to stdout; the constructor's ``report`` is the default of :meth:`Connection.items` and
  :meth:`Connection.serve`.
- ``topic=`` on a SUB URL means our ``?topic=NAME`` (a publisher's extra first frame), not a prefix of the first
  frame. The constructor's ``allow64`` counts for :meth:`Connection.send` too (0.1 read only ``send()``'s).
- Received arrays are writable and may be views of shared memory; dtypes beyond 0.1's (bool, uint32, bfloat16) are
  received as they are. Bad input raises :mod:`tensorcom.tenbin`'s errors (``ConfigError``/``DecodeError`` that are
  also ``AssertionError``) instead of bare asserts. There is no ``.socket`` or ``.context``.
- ``tonumpy`` handles 4-d tensors and numpy input without torch; ``tonumpy(dtype=)`` and ``transpose=False`` of
  both converters are honoured (0.1 ignored them).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import numpy as np
import zmq

from tensorcom import tenbin
from tensorcom._net.transport import Endpoint, open_endpoint, send_frames
from tensorcom.client.stream import StreamConnection
from tensorcom.errors import ConfigError, Timeout, URLError
from tensorcom.server.stream import StreamServer
from tensorcom.urls import SCHEMES, ParsedURL, expand_urls, parse_url

__all__ = [
    "WAIT_LOG_SECONDS",
    "Connection",
    "Statistics",
    "converter_table",
    "listify",
    "schemes",
    "tonumpy",
    "totorch",
    "transform_with",
]

log = logging.getLogger(__name__)

_RECEIVING = ("zpull", "zsub", "zrpull", "zrsub")
_SENDING = ("zpush", "zpub", "zrpush", "zrpub")

schemes: dict[str, tuple[int, bool]] = {
    name: (int(getattr(zmq, SCHEMES[name][0])), SCHEMES[name][1]) for name in (*_SENDING, *_RECEIVING)
}
"""0.1's table: scheme -> (ZMQ socket type, whether it binds)."""

WAIT_LOG_SECONDS = 10.0
"""How often a waiting ``recv()`` logs that it is still waiting."""


class Statistics:
    """Running counts and rates of messages and bytes, over everything and over the last ``horizon`` messages."""

    def __init__(self, horizon: int = 1000) -> None:
        self.horizon = horizon
        self.reset()

    def reset(self) -> None:
        """Start counting afresh."""
        self.start = time.time()
        self.last = time.time()
        self.count = 0
        self.total: float = 0
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.horizon)

    def add(self, x: float) -> None:
        """Count one message of ``x`` (e.g. bytes)."""
        self.last = time.time()
        self.count += 1
        self.total += x
        self.recent.append((self.last, x))

    def rate(self) -> float:
        """Messages per second since the start."""
        elapsed = self.last - self.start
        return self.count / elapsed if self.count and elapsed > 0 else 0

    def throughput(self) -> float:
        """Sum of ``x`` (bytes) per second since the start."""
        elapsed = self.last - self.start
        return self.total / elapsed if self.count and elapsed > 0 else 0

    def recent_rate(self) -> float:
        """Messages per second over the last ``horizon`` messages."""
        if self.count == 0:
            return 0
        delta = self.recent[-1][0] - self.recent[0][0]
        return len(self.recent) / delta if delta > 0 else 0

    def recent_throughput(self) -> float:
        """Sum of ``x`` per second over the last ``horizon`` messages."""
        if self.count == 0:
            return 0
        delta = self.recent[-1][0] - self.recent[0][0]
        return sum(x for _, x in self.recent) / delta if delta > 0 else 0

    def summary(self) -> str:
        """One line: the recent rate and throughput."""
        return f"rate {self.recent_rate():1f} msg/s throughput {self.recent_throughput():.2e} bytes/s"


def _is_tensor(a: Any) -> bool:
    return hasattr(a, "detach") and hasattr(a, "permute")  # a torch tensor, without importing torch


def tonumpy(dtype: Any = None, transpose: bool = True) -> Callable[[Any], Any]:
    """A converter from torch tensors to numpy arrays (images moved to channels-last); other values pass through."""

    def convert(a: Any) -> Any:
        if _is_tensor(a):
            if transpose and a.ndim == 3 and a.shape[0] in (3, 4):
                a = a.permute(1, 2, 0)
            elif transpose and a.ndim == 4 and a.shape[1] in (3, 4):
                a = a.permute(0, 2, 3, 1)
            a = a.detach().cpu().numpy()
        if dtype is not None and isinstance(a, np.ndarray):
            a = a.astype(dtype, copy=False)
        return a

    return convert


def totorch(dtype: Any = None, device: Any = "cpu", transpose: bool = True) -> Callable[[Any], Any]:
    """A converter from numpy arrays to torch tensors on ``device`` (images moved to channels-first, floats to
    float32 and 16- to 64-bit integers to int64 unless ``dtype`` says otherwise); other values pass through."""

    def convert(a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        import torch

        target = dtype
        if target is None:
            if a.dtype in (np.float16, np.float32, np.float64):
                target = torch.float32
            elif a.dtype in (np.int16, np.uint16, np.int32, np.int64):
                target = torch.int64
        elif isinstance(target, str):
            target = getattr(torch, target)
        if transpose and a.ndim == 3 and a.shape[2] in (3, 4):
            a = a.transpose(2, 0, 1)
        elif transpose and a.ndim == 4 and a.shape[3] in (3, 4):
            a = a.transpose(0, 3, 1, 2)
        return torch.as_tensor(a, device=device, dtype=target)

    return convert


def transform_with(sample: Sequence[Any], transformers: Sequence[Any] | None) -> Any:
    """Apply ``transformers[i % len(transformers)]`` to ``sample[i]`` (None leaves a value as it is); no
    transformers: ``sample`` unchanged."""
    if transformers is None or len(transformers) == 0:
        return sample
    if len(sample) < len(transformers):
        raise tenbin.TenbinConfigError(
            f"{len(transformers)} transformers for a batch of {len(sample)} arrays; expected at most one per array"
        )
    result = list(sample)
    for index, value in enumerate(sample):
        transform = transformers[index % len(transformers)]
        if transform is not None:
            result[index] = transform(value)
    return result


def listify(x: Any) -> Any:
    """None stays None, a list or tuple stays as it is, anything else becomes ``[x]``."""
    if x is None:
        return None
    if isinstance(x, list | tuple):
        return x
    return [x]


converter_table: dict[str, Callable[[Any], Any]] = dict(
    torch=totorch(), torch_cuda=totorch(device="cuda"), numpy=tonumpy()
)


def _converter(spec: Any) -> Any:
    if isinstance(spec, str):
        if spec not in converter_table:
            raise ConfigError(
                f"converters must be one of {', '.join(converter_table)}, a function or a list. Found: {spec!r}"
            )
        return converter_table[spec]
    if spec is not None and not callable(spec):
        raise ConfigError(f"a converter must be a name, a function or None. Found: {spec!r}")
    return spec


def _as_list(batch: Any) -> list[Any]:
    """A received batch as 0.1 returned it: a flat list of arrays."""
    if isinstance(batch, list):
        return batch
    if isinstance(batch, tuple):
        return list(batch)
    if isinstance(batch, dict):
        return list(batch.values())
    return [batch]


class _Sender:
    """Sends batches on stream URLs: each ``zpub``/``zrpub`` URL gets every batch, ``zpush``/``zrpush`` URLs get
    them in turn. Multipart messages go through one :class:`StreamServer` per URL, one-frame messages (0.1's
    ``multipart=False``) through plain sockets of the same transport layer."""

    def __init__(
        self,
        parsed: list[ParsedURL],
        *,
        multipart: bool,
        infos: Sequence[str] | None,
        queue: int,
        timeout: float | None,
        linger: float,
    ) -> None:
        kinds = {url.socket_type for url in parsed}
        if len(kinds) > 1:
            raise ConfigError(
                f"one Connection sends on PUSH or on PUB URLs, not both. Found: {' '.join(u.url for u in parsed)}"
            )
        self.every = kinds == {"PUB"}
        self.timeout = timeout
        self.linger = linger
        self._turn = 0
        self._servers: list[StreamServer] = []
        self._context: zmq.Context[Any] | None = None
        self._endpoints: list[Endpoint] = []
        try:
            if multipart:
                for url in parsed:
                    self._servers.append(
                        StreamServer(
                            None, url.url, queue=queue, linger=linger, send_timeout=timeout, infos=infos
                        )
                    )
            else:
                self._context = zmq.Context()
                for url in parsed:
                    self._endpoints.append(
                        open_endpoint(self._context, url, queue=queue, monitor=True, immediate=True)
                    )
        except BaseException:
            self.close(0.0)
            raise

    @property
    def endpoints(self) -> list[str]:
        return [address for server in self._servers for address in server.endpoints] + [
            endpoint.address for endpoint in self._endpoints
        ]

    def _targets(self, count: int) -> Sequence[int]:
        if self.every:
            return range(count)
        index = self._turn % count
        self._turn += 1
        return (index,)

    def send(self, arrays: list[Any]) -> None:
        for index in self._targets(len(self._servers)):
            self._servers[index].send(arrays)

    def send_buffer(self, buffer: bytearray) -> None:
        for index in self._targets(len(self._endpoints)):
            send_frames(self._endpoints[index], [buffer], timeout=self.timeout)

    def close(self, linger: float) -> None:
        for server in self._servers:
            server.close(linger=linger)
        self._servers = []
        for endpoint in self._endpoints:
            endpoint.close(linger=linger)
        self._endpoints = []
        if self._context is not None and not self._context.closed:
            self._context.term()


class Connection:
    """Send or receive lists of arrays over stream URLs, as tensorcom 0.1's ``Connection`` did.

    Args (0.1's):
        url: one URL or a list; braces expand unless ``noexpand``. Receiving: ``zsub``, ``zpull``, ``zrpull``,
            ``zrsub``; sending: ``zpub``, ``zpush``, ``zrpush``, ``zrpub``; ``+ipc`` for the ipc transport.
        epoch: what ``len()`` answers (iteration does not stop there).
        total: stop iterating after this many samples (-1: never).
        multipart: send one frame per header and per array (True), or one frame holding a ``.ten`` buffer.
            Receiving accepts both.
        infos: labels (up to 8 ASCII characters, one per array) written into sent headers and required of received
            ones.
        device, raw: accepted and ignored, as in 0.1.
        allow64: allow sending 64-bit arrays.
        batch_transforms, converters: functions applied to received arrays by position (wrapping around);
            ``converters`` may also name an entry of :data:`converter_table` ("torch", "torch_cuda", "numpy").
        batch_count: whether :meth:`batchsize` counts samples (the first array's length) or batches.
        report: default of :meth:`items` and :meth:`serve`'s ``report``: log rates every ``report`` samples.
        stats_horizon: the messages :attr:`stats` keeps for its recent rates.
        noexpand: do not expand braces (a URL with braces is then refused).

    Args (ours, keyword only):
        timeout: seconds ``recv()`` waits for a batch and ``send()`` for room before raising
            :class:`tensorcom.Timeout` (None, the default: wait forever, as 0.1 did, logging while waiting).
        queue: batches each socket holds per peer before the sender waits (the high-water mark).
        linger: seconds :meth:`close` gives queued batches to leave.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        epoch: int = 100000,
        total: int = -1,
        multipart: bool = True,
        infos: Sequence[str] | None = None,
        device: Any = None,
        allow64: bool = False,
        raw: bool = False,
        batch_transforms: Any = None,
        batch_count: bool = True,
        converters: Any = None,
        report: int = -1,
        stats_horizon: int = 1000,
        noexpand: bool = False,
        *,
        timeout: float | None = None,
        queue: int = 2,
        linger: float = 5.0,
    ) -> None:
        if infos is not None and (
            not isinstance(infos, list | tuple) or not all(isinstance(i, str) for i in infos)
        ):
            raise ConfigError(f"infos must be None or a list of labels (strings). Found: {infos!r}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds or None. Found: {timeout}")
        if queue < 1:
            raise ConfigError(f"queue must be >= 1 (batches). Found: {queue}")
        if linger < 0:
            raise ConfigError(f"linger must be >= 0 seconds. Found: {linger}")
        self.stats = Statistics(stats_horizon)
        self.multipart = multipart
        self.infos = infos
        self.device = device
        self.allow64 = allow64
        self.raw = False  # 0.1 ignored raw= too
        self.epoch = epoch
        self.total = total
        self.batch_transforms = listify(batch_transforms)
        self.batch_count = batch_count
        self.converters = (
            [_converter(c) for c in converters]
            if isinstance(converters, list | tuple)
            else listify(_converter(converters))
        )
        self.count = 0
        self.report = report
        self.noexpand = noexpand
        self.timeout = timeout
        self.queue = queue
        self.linger = linger
        self._urls: list[ParsedURL] = []
        self._receiver: StreamConnection | None = None
        self._sender: _Sender | None = None
        self._closed = False
        if url is not None:
            self.connect([url] if isinstance(url, str) else list(url))

    # -- sockets ------------------------------------------------------------------------------------------------

    def connect(self, url: str | Sequence[str], topic: str = "") -> None:
        """Add URLs to send on or receive from (``topic``: subscribe SUB URLs to ``?topic=``)."""
        if self._closed:
            raise ConfigError("this Connection is closed")
        items = [url] if isinstance(url, str) else list(url)
        if self.noexpand:
            for item in items:
                if "{" in item or "}" in item:
                    raise URLError(f"{item!r}: noexpand=True, but ZMQ cannot use a URL with braces")
            expanded = items
        else:
            expanded = expand_urls(items)
        parsed = [self._parse(item, topic) for item in expanded]
        direction = {url.scheme in _SENDING for url in [*self._urls, *parsed]}
        if len(direction) > 1:
            shown = " ".join(u.url for u in [*self._urls, *parsed])
            raise ConfigError(f"one Connection either sends or receives; these URLs do both: {shown}")
        previous = self._urls
        if self._receiver is not None or self._sender is not None:
            log.info(
                "connect(): reopening the sockets with %s", " ".join(u.url for u in [*previous, *parsed])
            )
            self._close_sockets(0.0)
        try:
            self._open([*previous, *parsed])
        except BaseException:
            if previous:
                self._open(previous)
            raise
        self._urls = [*previous, *parsed]

    def _open(self, urls: list[ParsedURL]) -> None:
        if urls[0].scheme in _SENDING:
            self._sender = _Sender(
                urls,
                multipart=self.multipart,
                infos=self.infos,
                queue=self.queue,
                timeout=self.timeout,
                linger=self.linger,
            )
        else:
            self._receiver = StreamConnection(
                [u.url for u in urls], timeout=WAIT_LOG_SECONDS, queue=self.queue
            )

    @staticmethod
    def _parse(url: str, topic: str) -> ParsedURL:
        parsed = parse_url(url)
        if parsed.scheme not in schemes:
            raise ConfigError(
                f"{url!r}: zcom.Connection takes tensorcom 0.1's stream schemes ({', '.join(schemes)}); "
                "use tensorcom.Connection for zreq:// URLs"
            )
        if topic and parsed.socket_type == "SUB" and not parsed.topic:
            parsed = parse_url(f"{url}?topic={topic}")
        return parsed

    def _receiving(self) -> StreamConnection:
        if self._receiver is None:
            self._refuse("receive from", _RECEIVING)
        return self._receiver

    def _sending(self) -> _Sender:
        if self._sender is None:
            self._refuse("send on", _SENDING)
        return self._sender

    def _refuse(self, verb: str, wanted: tuple[str, ...]) -> NoReturn:
        if self._closed:
            raise ConfigError("this Connection is closed")
        if not self._urls:
            raise ConfigError(f"no URL to {verb}: pass url= or call connect(url) first")
        raise ConfigError(
            f"cannot {verb} {' '.join(u.url for u in self._urls)}; that takes {', '.join(wanted)} URLs"
        )

    @property
    def endpoints(self) -> list[str]:
        """The addresses of the sockets (bound ones read back, so port 0 shows its port)."""
        if self._sender is not None:
            return self._sender.endpoints
        return self._receiving().endpoints

    def _close_sockets(self, linger: float) -> None:
        receiver, sender = self._receiver, self._sender
        self._receiver = self._sender = None
        if receiver is not None:
            receiver.close()
        if sender is not None:
            sender.close(linger)

    def close(self) -> None:
        """Close the sockets; batches still queued for sending get ``linger`` seconds to leave."""
        self._closed = True
        self._close_sockets(self.linger)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._close_sockets(0.0)
        except Exception:  # the interpreter may be shutting down
            pass

    # -- sending --------------------------------------------------------------------------------------------------

    def send(self, data: Sequence[Any], allow64: bool = False) -> None:
        """Send a list of arrays (64-bit ones only with ``allow64`` here or in the constructor)."""
        tenbin.check_acceptable_input_type(data, allow64 or self.allow64)
        sender = self._sending()
        if self.multipart:
            sender.send(list(data))
        else:
            sender.send_buffer(tenbin.encode_buffer(data, infos=self.infos))
        self.stats.add(sum(tenbin.bytelen(a) for a in data))

    def write(self, data: Sequence[Any]) -> None:
        """The same as :meth:`send`."""
        self.send(data)

    def serve(self, source: Iterable[Sequence[Any]], report: int = -1) -> None:
        """Send every batch of ``source``, logging rates every ``report`` samples."""
        report = report if report > 0 else self.report
        count = 0
        next_report = 0
        for sample in source:
            self.send(sample)
            if report > 0 and count >= next_report:
                log.info("count %d %s", count, self.stats.summary())
                next_report += report
            count += self.batchsize(sample)

    # -- receiving ------------------------------------------------------------------------------------------------

    def _receive(self) -> list[Any]:
        receiver = self._receiving()
        started = time.monotonic()
        deadline = None if self.timeout is None else started + self.timeout
        while True:
            step = (
                WAIT_LOG_SECONDS if deadline is None else min(WAIT_LOG_SECONDS, deadline - time.monotonic())
            )
            receiver.timeout = max(step, 0.001)
            try:
                batch = receiver.recv()
            except Timeout:
                now = time.monotonic()
                where = ", ".join(receiver.endpoints)
                if deadline is not None and now >= deadline:
                    raise Timeout(f"no batch within {self.timeout} s from {where}") from None
                log.warning("waiting for a batch from %s (%.0f s so far)", where, now - started)
                continue
            arrays = _as_list(batch)
            if self.infos is not None:
                tenbin.check_infos(arrays, receiver.last.infos, self.infos)
            return arrays

    def recv(self) -> list[Any]:
        """Receive the next batch: its arrays as a list, after ``batch_transforms`` and ``converters``."""
        data = self._receive()
        self.stats.add(sum(getattr(a, "nbytes", 0) for a in data))
        data = transform_with(data, self.batch_transforms)
        data = transform_with(data, self.converters)
        self.count += self.batchsize(data)
        return data

    def batchsize(self, xs: Sequence[Any]) -> int:
        """The samples in a batch (the first array's length), or 1 with ``batch_count=False``."""
        if not self.batch_count:
            return 1
        try:
            return len(xs[0])
        except (TypeError, IndexError):  # no array, or a 0-d one
            return 1

    def items(self, report: int = -1) -> Iterator[list[Any]]:
        """Receive batches forever (or until ``total`` samples), logging rates every ``report`` samples."""
        report = report if report > 0 else self.report
        count = 0
        next_report = 0
        while True:
            if self.total > 0 and self.count >= self.total:
                return
            result = self.recv()
            if report > 0 and count >= next_report:
                log.info("count %d %s", count, self.stats.summary())
                next_report += report
            count += self.batchsize(result)
            yield result

    def __iter__(self) -> Iterator[list[Any]]:
        return self.items()

    def __len__(self) -> int:
        """``epoch``, for frameworks that ask for a length; iteration does not stop there."""
        return self.epoch
