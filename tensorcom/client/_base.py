"""What every client shares, and :class:`Connection`, the name users call.

``Connection(urls, **options)`` builds the kind of client the URLs' scheme asks for: a
:class:`~tensorcom.client.stream.StreamConnection` for ``zpull``/``zsub``/``zrpull``/``zrsub``, a
:class:`~tensorcom.client.request.RequestConnection` for ``zreq``. Each kind registers its schemes when its class is
defined (``class StreamConnection(Connection, schemes=(...), mode="stream")``), so this module imports neither kind;
:mod:`tensorcom.client` imports both.

Type checkers see ``Connection.__new__`` (every option of every kind, keyword-only) for ``Connection(...)``, and
each kind's own ``__init__`` for ``StreamConnection(...)`` or ``RequestConnection(...)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import zmq

from tensorcom._net import allocator
from tensorcom._net import shm as _shm
from tensorcom._net.security import ClientKeys, KeyPath, client_keys_from
from tensorcom._net.transport import Endpoint, open_endpoint, parse_endpoints
from tensorcom.convert import ConverterSpec, make_converters
from tensorcom.errors import ConfigError, URLError
from tensorcom.urls import SCHEMES, ParsedURL, expand_urls, parse_url

__all__ = ["BatchInfo", "Connection", "adapter_source", "check_fan_in", "check_limits", "default_io_threads"]


@dataclass
class BatchInfo:
    """What is known about the last batch received, besides its arrays.

    ``endpoint`` is the socket address (stream mode) or the server's name (zreq); ``step``, ``epoch`` and
    ``indices`` (the dataset indices of its samples) are known for zreq batches and pipeline-mode stream batches.
    """

    endpoint: str = ""
    nbytes: int = 0
    infos: list[str] = field(default_factory=list)
    count: int = 0
    step: int | None = None
    epoch: int | None = None
    indices: list[int] = field(default_factory=list)


class _Receiver:
    """Sockets to servers, and what every kind of connection does with them: check the common options, convert
    arrays, count batches, iterate with ``epoch``/``total`` limits, close.

    Its ``__init__`` takes the options every kind shares; each kind's ``__init__`` checks its own options first
    (so a bad setting fails before any socket opens) and then calls it.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    """The URL schemes this kind of connection receives from (set by ``Connection`` subclasses that register)."""
    mode: ClassVar[str] = ""
    """A few words naming this kind for error messages: "stream", "deterministic request"."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        queue: int,
        immediate: bool,
        converters: ConverterSpec,
        timeout: float | None,
        epoch: int | None,
        total: int | None,
        client_key: KeyPath | None,
        server_public_key: KeyPath | None,
        max_message_size: int,
        shm: bool | None,
        io_threads: int | None = None,
        stripes: int = 1,
    ) -> None:
        check_limits(epoch, total, timeout)
        check_fan_in(io_threads, stripes)
        socket_types = {SCHEMES[scheme][0] for scheme in self.schemes}
        parsed = parse_endpoints(urls, socket_types, f"{self.mode} Connection")
        sockets = sum(1 if url.bind else stripes for url in parsed)
        self.stripes = stripes
        self.io_threads = io_threads if io_threads is not None else self._default_io_threads(sockets)
        self._keys: ClientKeys | None = client_keys_from(client_key, server_public_key)
        self.timeout = timeout
        self.epoch = epoch
        self.total = total
        self.convert = make_converters(converters)
        self.count = 0
        self.malformed = 0
        self.last = BatchInfo()
        self._shm = shm is not False and _shm.enabled()
        self._reader = _shm.Reader()
        allocator.tune()  # small batches: no heap shrink-and-regrow per batch
        self._context: zmq.Context[Any] = zmq.Context(io_threads=self.io_threads)
        self._endpoints: list[Endpoint] = []
        try:
            for url in parsed:
                self._before_open(url, queue=queue, max_message_size=max_message_size)
                for _ in range(1 if url.bind else stripes):  # a bound socket takes any number of connections
                    self._endpoints.append(
                        open_endpoint(
                            self._context,
                            url,
                            queue=queue,
                            monitor=True,
                            keys=self._keys,
                            max_message_size=max_message_size,
                            immediate=immediate,
                            connect=self._connects_at_once(url),
                        )
                    )
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        for endpoint in self._endpoints:
            self._poller.register(endpoint.socket, zmq.POLLIN)

    def _default_io_threads(self, sockets: int) -> int:
        """The ZeroMQ I/O threads for ``sockets`` sockets to servers when ``io_threads`` is not given."""
        return default_io_threads(sockets)

    def _before_open(self, url: ParsedURL, *, queue: int, max_message_size: int) -> None:
        """Called before the socket for ``url`` opens (a subclass may open a companion socket first)."""

    def _connects_at_once(self, url: ParsedURL) -> bool:
        """Whether the socket for a connecting ``url`` connects as it opens (a subclass may connect it later)."""
        return True

    @property
    def endpoints(self) -> list[str]:
        """The addresses this connection receives from, one per socket (a URL striped over k sockets shows k times;
        bound addresses are read back, so port 0 shows its port)."""
        return [endpoint.address for endpoint in self._endpoints]

    def _ensure_open(self) -> None:
        if self._context.closed:
            raise ConfigError("this Connection is closed")

    def recv(self) -> Any:
        """The next batch; details of it go to ``self.last``. A finite epoch's end raises StopIteration."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Where the stream stands after the last batch received: plain data to resume from."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The same as :meth:`state`: the checkpoint name every face of tensorcom answers to."""
        return self.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch ``state`` (from :meth:`state_dict`) was taken at."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Continue from the start of ``epoch``, as ``DistributedSampler.set_epoch`` users expect."""
        raise NotImplementedError

    def seek(self, control: str, state: dict[str, Any] | None = None, *, epoch: int | None = None) -> None:
        """Move a stream server to ``state`` or to the start of ``epoch`` (stream connections only)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        produced = 0
        while self.epoch is None or produced < self.epoch:
            if self.total is not None and self.count >= self.total:
                return
            try:
                batch = self.recv()
            except StopIteration:
                return
            yield batch
            produced += 1

    def __len__(self) -> int:
        """The number of batches an iteration yields (``epoch``), for frameworks that ask for a length."""
        if self.epoch is None:
            raise TypeError(
                "this Connection has no length; pass epoch=N (batches per iteration) to give it one"
            )
        return self.epoch

    def close(self) -> None:
        """Close every socket at once (nothing is waiting to be sent from a receiving client)."""
        for endpoint in self._endpoints:
            endpoint.close()
        self._endpoints = []
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        context = getattr(self, "_context", None)
        if context is not None and not context.closed:
            self.close()


class _Default:
    """The default of an option in ``Connection.__new__``: the kind of connection built decides its value."""

    def __repr__(self) -> str:
        return "<the kind's default>"


_DEFAULT: Any = _Default()


class Connection(_Receiver):
    """Receive batches from one or more servers; the URLs' scheme picks the kind of connection.

    ``Connection("zsub://host:7880", queue=4)`` builds a :class:`~tensorcom.client.stream.StreamConnection`,
    ``Connection("zreq://host:788{0..3}", seed=1, rank=0, world_size=8)`` a
    :class:`~tensorcom.client.request.RequestConnection` (the deterministic, resumable request protocol); both are
    instances of :class:`Connection`. The options are those of the kind built (see each class): an option of the
    other kind raises :class:`tensorcom.ConfigError` naming it, an unknown one a TypeError.

    Options every kind takes:
        urls: one URL, a whitespace-separated string of URLs, or a list; braces expand (``zsub://h:788{0..3}``).
        converters: "numpy" (default), "torch", a callable applied to each array, or one per array position.
        timeout: seconds to wait for a batch before raising :class:`tensorcom.Timeout` (None waits forever).
        epoch: if set, each ``iter(connection)`` yields this many batches, then stops; the next ``iter`` goes on.
        total: if set, the connection yields at most this many batches in all, then every iteration ends.
        client_key, server_public_key: CURVE: this client's ``.key_secret`` file and the server's ``.key`` file
            (default: $TENSORCOM_CLIENT_KEY and $TENSORCOM_SERVER_PUBLIC_KEY; neither: plain). A server that
            refuses the key, or that is plain while this client uses CURVE (or the reverse), raises
            :class:`tensorcom.SecurityError` instead of a silent wait.
        max_message_size: the largest frame (one array) accepted, in bytes; a server that sends a larger one is
            disconnected (default :data:`tensorcom._net.transport.MAX_BATCH_FRAME`, 1 GiB).
        shm: accept batches in shared memory from servers on this host (``ipc://`` URLs; :mod:`tensorcom._net.shm`).
            None (the default): yes, unless $TENSORCOM_SHM is 0. Such arrays are views of shared memory; the
            server reuses the memory once they are all dropped.
        io_threads: the ZeroMQ I/O threads that move this connection's bytes between the kernel and its queues (an
            int >= 1). One thread carries a few GB/s; a connection to many servers, or to a few fast ones, needs
            more. None (the default): :func:`default_io_threads` of the number of sockets the data arrives on
            (``connection.io_threads`` tells the number chosen).
        stripes: sockets opened to each server URL this connection connects to (an int >= 1, default 1), so one
            fast server's batches spread over that many TCP connections (one connection tops out well below a
            100 GbE link). A URL this connection binds keeps one socket (servers connect to it as often as they
            like). Each kind says what stripes do to the order of batches.
    """

    _kinds: ClassVar[dict[str, type[Connection]]] = {}
    _options: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, *, schemes: Sequence[str] = (), mode: str = "", **kwargs: Any) -> None:
        """Register a kind of connection for ``schemes`` (``mode`` names it in messages); record the options its
        ``__init__`` takes."""
        super().__init_subclass__(**kwargs)
        cls._options = frozenset(
            name
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        )
        if not schemes:
            return
        if not mode:
            raise TypeError(f"{cls.__name__} registers schemes {list(schemes)} without a mode naming them")
        for scheme in schemes:
            if scheme not in SCHEMES:
                raise TypeError(f"{cls.__name__} registers an unknown scheme {scheme!r}")
            if scheme in Connection._kinds:
                raise TypeError(f"{scheme}:// is served by {Connection._kinds[scheme].__name__} already")
        cls.schemes = tuple(schemes)
        cls.mode = mode
        for scheme in schemes:
            Connection._kinds[scheme] = cls

    def __new__(
        cls,
        urls: str | Sequence[str],
        *,
        converters: ConverterSpec = _DEFAULT,
        timeout: float | None = _DEFAULT,
        epoch: int | None = _DEFAULT,
        total: int | None = _DEFAULT,
        client_key: KeyPath | None = _DEFAULT,
        server_public_key: KeyPath | None = _DEFAULT,
        max_message_size: int = _DEFAULT,
        shm: bool | None = _DEFAULT,
        queue: int = _DEFAULT,
        on_malformed: str = _DEFAULT,
        seed: int = _DEFAULT,
        rank: int | None = _DEFAULT,
        world_size: int | None = _DEFAULT,
        prefetch: int = _DEFAULT,
        heartbeat: float = _DEFAULT,
        dead_after: float | None = _DEFAULT,
        state: dict[str, Any] | None = _DEFAULT,
        control: str | None = _DEFAULT,
        io_threads: int | None = _DEFAULT,
        stripes: int = _DEFAULT,
        request_deadline: float | None = _DEFAULT,
    ) -> Connection:
        arguments = locals()
        given = [name for name in _NEW_OPTIONS if arguments[name] is not _DEFAULT]
        url, kind = _kind_of(urls)
        if cls is not Connection and not issubclass(cls, kind):
            raise URLError(
                f"{url!r} is a {kind.mode} URL; a {cls.__name__} receives {_schemes_text(cls)} URLs"
            )
        target = kind if cls is Connection else cls
        foreign = [name for name in given if name not in target._options]
        if foreign:
            raise _foreign_options(foreign, url, target)
        return object.__new__(target)


_NEW_OPTIONS = tuple(inspect.signature(Connection.__new__).parameters)[2:]  # after cls and urls


def _kind_of(urls: str | Sequence[str]) -> tuple[str, type[Connection]]:
    """The first URL and the kind of connection that receives from all of ``urls``."""
    expanded = expand_urls(urls)
    kinds: dict[type[Connection], str] = {}
    for url in expanded:
        parsed = parse_url(url)
        kind = Connection._kinds.get(parsed.scheme)
        if kind is None:
            raise URLError(
                f"{url!r}: a Connection cannot use a {parsed.scheme} ({parsed.socket_type}) socket; expected "
                f"one of {', '.join(sorted(Connection._kinds))}"
            )
        kinds.setdefault(kind, url)
    if len(kinds) > 1:
        (first, one), (other, another) = list(kinds.items())[:2]
        raise URLError(
            f"{one!r} is a {first.mode} URL and {another!r} a {other.mode} URL; one Connection receives one kind"
        )
    return expanded[0], next(iter(kinds))


def _schemes_text(kind: type[Connection]) -> str:
    return ", ".join(f"{scheme}://" for scheme in kind.schemes)


def _foreign_options(names: list[str], url: str, kind: type[Connection]) -> Exception:
    """The error for options that ``kind`` does not take: a ConfigError naming the kind that takes them."""
    takers = {other for other in Connection._kinds.values() if other is not kind}
    for other in takers:
        theirs = [name for name in names if name in other._options]
        if theirs:
            listed = ", ".join(f"{name}=" for name in theirs)
            verb = "is an option" if len(theirs) == 1 else "are options"
            return ConfigError(
                f"{listed} {verb} of {_schemes_text(other)} URLs ({other.mode} mode); {url} is a {kind.mode} URL"
            )
    return TypeError(f"{kind.__name__} takes no option {', '.join(f'{name}=' for name in names)}")


def check_limits(epoch: int | None, total: int | None, timeout: float | None) -> None:
    """Check the iteration limits and the receive timeout that every kind of Connection takes."""
    for name, value in (("epoch", epoch), ("total", total)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 batch or None. Found: {value}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds or None. Found: {timeout}")


SOCKETS_PER_IO_THREAD = 2
"""Sockets to servers per ZeroMQ I/O thread when ``io_threads`` is not given (see :func:`default_io_threads`)."""
MAX_DEFAULT_IO_THREADS = 4
"""The most I/O threads chosen by default; ``io_threads=`` sets more."""


def default_io_threads(sockets: int) -> int:
    """The I/O threads for a connection whose data arrives on ``sockets`` sockets: one for one or two sockets, one more
    per further :data:`SOCKETS_PER_IO_THREAD`, at most :data:`MAX_DEFAULT_IO_THREADS`.

    Why (benchmarks/README.md, "Many servers into one rank"): an I/O thread does most of a client's work (it reads
    the bytes out of the kernel: about 0.2 CPU s/GB of the 0.25 a client spends), so one thread carries about
    5 GB/s, and each TCP connection stays on one thread; one connection carries about 2 GB/s on a real 100 GbE link
    (libzmq issue 3525), so two connections per thread keep the thread from being the limit.
    """
    return max(1, min(MAX_DEFAULT_IO_THREADS, -(-sockets // SOCKETS_PER_IO_THREAD)))


def check_fan_in(io_threads: int | None, stripes: int) -> None:
    """Check ``io_threads`` (an int >= 1 or None) and ``stripes`` (an int >= 1)."""
    if io_threads is not None and (
        isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1
    ):
        raise ConfigError(f"io_threads must be an int >= 1 or None. Found: {io_threads!r}")
    if isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1:
        raise ConfigError(f"stripes must be an int >= 1. Found: {stripes!r}")


def adapter_source(source: Any, batches: int | None, options: dict[str, Any]) -> tuple[list[str] | None, Any]:
    """What the framework adapters take as ``source``: URLs (opened later with ``options``) or an open Connection.

    Returns ``(urls, None)`` or ``(None, connection)``; checks ``batches`` (an int >= 1 or None) on the way.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ConfigError(f"batches must be an int >= 1 or None. Found: {batches!r}")
    if isinstance(source, str | Sequence):
        return expand_urls(source), None
    if hasattr(source, "recv") and hasattr(source, "state"):
        if options:
            raise ConfigError(f"connection options {sorted(options)} need URLs, not an open Connection")
        return None, source
    raise ConfigError(f"source must be URLs or a tensorcom Connection. Found: {type(source).__name__}")
