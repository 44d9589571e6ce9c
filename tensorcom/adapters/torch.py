"""PyTorch adapter: a tensorcom Connection as an ``IterableDataset`` for ``DataLoader(dataset, batch_size=None)``.

::

    dataset = ConnectionDataset("zreq://data1:7880", seed=17, device="cuda:0", batches=1000)
    loader = DataLoader(dataset, batch_size=None)        # the servers batch; no re-batching, no loader workers
    for epoch in range(start_epoch, epochs):
        dataset.set_epoch(epoch)                          # as with a DistributedSampler (optional here)
        for images, labels in loader:                     # 1000 batches of torch tensors on cuda:0
            ...
            checkpoint["data"] = dataset.state_dict()     # resume: dataset.load_state_dict(checkpoint["data"])

Batches arrive as numpy arrays sharing the received frames' memory; :class:`tensorcom.adapters.device.DeviceTransfer`
turns them into tensors without copying and moves them to ``device`` (pinned staging, non-blocking copies and at
most ``max_batches_on_device`` batches in flight for CUDA).

How it follows ``DataLoader``'s conventions:

- **Epochs.** With ``batches=N``, ``len(dataset) == N`` and each iteration is one epoch of N batches: the next N
  batches of the stream. ``dataset.epoch`` counts them and ``dataset.position`` is the number of batches delivered in
  the current one. ``set_epoch(e)`` moves to the start of epoch e, i.e. step ``e * N`` of the servers' stream (for
  a pipeline that ends its epochs, ``repeating=False``, the start of its epoch e, and then N must be the number of
  batches in each of its epochs; a mismatch raises :class:`tensorcom.ConfigError` at its first end). It does nothing
  when the dataset already stands in epoch e, so the usual loop calling ``set_epoch(epoch)`` keeps a resumed
  position. With ``batches=None`` an iteration runs until the servers' epoch ends (for ever on a repeating
  pipeline), and ``set_epoch(e)`` starts the pipeline's epoch e.
- **Resume.** :meth:`state_dict` is plain data: the epoch, the position in it and the connection's state.
  :meth:`load_state_dict` of a state taken k batches into an epoch makes the next iteration deliver the N - k
  batches left in that epoch, and the one after a full epoch; ``last.step`` goes on from the step it had.
  ``torchdata``'s ``StatefulDataLoader`` calls both by itself. (``state``, ``load_state`` and ``set_state`` are the
  same methods.)
- **No loader workers.** Every ``num_workers >= 1`` is refused with a ConfigError, raised by the worker before it
  connects: the servers already decode and batch, so workers would only add a copy of every batch, and the main
  process's ``state_dict()`` could not see what they received. For zreq, each worker would also receive the same
  stream; for zsub (and zrsub, which binds) each would receive every batch; zpull binds one address; zrpull workers
  would split the stream so that no state describes it.
- **No re-batching.** The servers' batches are the DataLoader's batches, so ``batch_size`` must be None; the default
  ``batch_size=1`` (or any other number) would stack server batches into a new leading dimension, and is refused
  when iteration starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.data

from tensorcom.adapters.device import DeviceTransfer
from tensorcom.client._base import adapter_source
from tensorcom.datasets.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tensorcom.errors import ConfigError, StateError
from tensorcom.urls import parse_url

__all__ = ["ConnectionDataset", "normalize_images"]

STATE_KIND = "tensorcom.dataset"
STATE_FORMAT = 1

_WHY_NO_WORKERS = {
    "zreq": "each worker would receive the same zreq stream",
    "zsub": "each worker would subscribe and receive every batch",
    "zrsub": "each worker would bind the same address and receive every batch",
    "zpull": "each worker would bind the same address",
    "zrpull": "the workers would split the stream between them, in no order a state can describe",
}


class ConnectionDataset(torch.utils.data.IterableDataset):
    """Iterate the batches of a tensorcom :class:`~tensorcom.Connection` as torch tensors (see the module docstring).

    Args:
        source: URLs (the connection opens on first iteration, in the process that iterates) or an open
            ``Connection`` (used as it is).
        batches: batches per epoch (then ``len(dataset)`` is defined); None iterates until the servers' epoch ends
            (a non-repeating pipeline) or for ever.
        device, to_device, max_batches_on_device, pin_memory, non_blocking: see :class:`DeviceTransfer`.
        transform: applied to each batch after the device transfer (e.g. :func:`normalize_images` on the images).
        connection_options: passed to ``Connection`` (seed, rank, world_size, prefetch, timeout, ...); ``state``
            may be a :meth:`state_dict` (or a connection's state) to resume from.
    """

    def __init__(
        self,
        source: Any,
        *,
        batches: int | None = None,
        device: str | torch.device | None = None,
        to_device: Callable[[Any], Any] | None = None,
        max_batches_on_device: int = 2,
        pin_memory: bool | None = None,
        non_blocking: bool = True,
        transform: Callable[[Any], Any] | None = None,
        **connection_options: Any,
    ) -> None:
        super().__init__()
        state = connection_options.pop("state", None)
        self.urls: list[str] | None
        self.connection: Any
        self.urls, self.connection = adapter_source(source, batches, connection_options)
        self.batches = batches
        self.transform = transform
        self.connection_options = connection_options
        self.transfer = DeviceTransfer(
            device,
            to_device=to_device,
            max_batches_on_device=max_batches_on_device,
            pin_memory=pin_memory,
            non_blocking=non_blocking,
        )
        self.epoch = 0
        """The epoch the dataset stands in (the one the next batch belongs to, or that just ended)."""
        self.position = 0
        """Batches delivered in the current epoch (``batches`` once it is complete)."""
        self._pending_state: dict[str, Any] | None = None  # a connection state to open (or move) with
        self._pending_move: tuple[str, int] | None = None  # ("epoch", e) or ("step", s), from set_epoch
        self._restored = False  # no iteration since load_state_dict
        self._jumped = False  # set_epoch moved to step e * N and no batch came since
        self._ends_epochs = False  # the servers' pipeline was seen to end an epoch (repeating=False)
        self._next_step: int | None = 0  # the absolute step of the next batch, when known
        self._last: Any = None
        if state is not None:
            self.load_state_dict(state)

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("this ConnectionDataset has no length; pass batches=N to give it one")
        return self.batches

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        self._check_worker()
        self._check_collation()
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        connection = self._connect()
        restored, self._restored = self._restored, False
        if self.batches is not None and self.position >= self.batches:
            self.epoch, self.position = self.epoch + 1, 0
            if restored:
                return  # resumed after the last batch of an epoch: what is left of it is nothing
        while self.batches is None or self.position < self.batches:
            try:
                batch = self._receive(connection)
            except StopIteration:
                if self.batches is None:
                    break
                self._after_pipeline_epoch(connection, self.batches)
                continue
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def _receive(self, connection: Any) -> Any:
        batch = connection.recv()
        self._last = connection.last
        step = getattr(self._last, "step", None)
        self._next_step = None if step is None else step + 1
        self._jumped = False
        batch = self.transfer(batch)
        return batch if self.transform is None else self.transform(batch)

    def _after_pipeline_epoch(self, connection: Any, batches: int) -> None:
        """The servers' pipeline ended an epoch inside a ``batches=N`` iteration: check it is where ours ends."""
        if self._jumped:  # set_epoch(e) asked for step e * N of an epoch that has fewer: go to its epoch e
            self._jumped = False
            self._ends_epochs = True
            self._next_step = 0
            connection.set_epoch(self.epoch)
            return
        self._ends_epochs = True
        length = self._next_step
        if self.position != 0 or length != batches:
            found = f"{length} batches" if length is not None else "an unknown number of batches"
            raise ConfigError(
                f"the servers' pipeline ended its epoch after {found}, {self.position} batches into epoch "
                f"{self.epoch} of this dataset: with a pipeline that ends its epochs (repeating=False), batches must "
                f"be the number of batches in each of them (or None). Found: batches={batches}"
            )
        self._next_step = 0

    def _connect(self) -> Any:
        if self.connection is None:
            from tensorcom.client import Connection

            options = dict(self.connection_options)
            state, self._pending_state = self._pending_state, None
            if state is not None and self._is_request():
                options["state"], state = state, None
            self.connection = Connection(self.urls or [], **options)
            if state is not None:
                self.connection.load_state_dict(state)
        elif self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.connection.load_state_dict(state)
        if self._pending_move is not None:
            (kind, value), self._pending_move = self._pending_move, None
            if kind == "epoch":
                self.connection.set_epoch(value)
            else:
                self.connection.seek_step(value)
        return self.connection

    def _is_request(self) -> bool:
        """Whether the connection is (or will be) a zreq one, which can move to any step."""
        if self.connection is not None:
            return hasattr(self.connection, "seek_step")
        return all(parse_url(url).scheme == "zreq" for url in self.urls or [])

    # -- DataLoader conventions ----------------------------------------------------------------------------------

    def _check_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        if self.urls is None:
            why = "an open Connection cannot be shared with worker processes"
        else:
            schemes = sorted({parse_url(url).scheme for url in self.urls})
            why = "; ".join(
                _WHY_NO_WORKERS.get(scheme, f"{scheme}:// cannot be shared") for scheme in schemes
            )
        raise ConfigError(
            f"a ConnectionDataset cannot be read by DataLoader workers. Found: num_workers={info.num_workers} "
            f"({why}, and state_dict() in the main process would not see their batches). Use num_workers=0: the "
            "servers already decode and batch, so workers would only add a copy of every batch"
        )

    def _check_collation(self) -> None:
        """Refuse a DataLoader that batches again (``batch_size`` not None): it would stack server batches.

        ``iter(dataset)`` is called by the DataLoader's fetcher (torch's, also under torchdata's
        ``StatefulDataLoader``), which holds the dataset and whether it collates; it is found among the callers.
        """
        frame = inspect.currentframe()
        try:
            for _ in range(12):
                if frame is None:
                    return
                owner = frame.f_locals.get("self")
                if owner is not None and type(owner).__module__.startswith(("torch.", "torchdata.")):
                    for dataset_name, flag_name in (
                        ("dataset", "auto_collation"),
                        ("_dataset", "_auto_collation"),
                    ):
                        if getattr(owner, dataset_name, None) is self and hasattr(owner, flag_name):
                            if getattr(owner, flag_name):
                                raise ConfigError(
                                    "DataLoader(dataset) with a batch_size other than None would stack the "
                                    "servers' batches into a new leading dimension (batches of batches); the "
                                    "servers batch already: pass DataLoader(dataset, batch_size=None)"
                                )
                            return
                frame = frame.f_back
        finally:
            del frame

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``, unless the dataset already stands in it (see the module docstring)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0. Found: {epoch!r}")
        if epoch == self.epoch:
            return
        complete = self.batches is not None and self.position >= self.batches
        if complete and epoch == self.epoch + 1:
            self.epoch, self.position, self._restored = epoch, 0, False  # where the stream goes anyway
            return
        if self.batches is not None and not self._is_request():
            raise ConfigError(
                f"set_epoch({epoch}) would move a stream to step {epoch} * {self.batches}; only zreq servers can "
                "serve any step (with stream URLs, set_epoch moves a pipeline server with batches=None and control=)"
            )
        self.epoch, self.position, self._restored = epoch, 0, False
        self._pending_state = None
        if self.batches is None or self._ends_epochs:
            self._pending_move, self._next_step = ("epoch", epoch), 0
        else:
            self._pending_move, self._next_step = ("step", epoch * self.batches), epoch * self.batches
            self._jumped = True
        if self.connection is not None:
            self._connect()

    # -- state ---------------------------------------------------------------------------------------------------

    @property
    def last(self) -> Any:
        """``connection.last`` of the last batch (step, epoch, sample indices for zreq); None before any."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """Where the dataset stands after the last batch yielded: plain data for a checkpoint."""
        if self.connection is None and self._pending_state is not None and self._pending_move is None:
            connection_state = self._pending_state
        else:
            connection_state = dict(self._connect().state_dict())
        return {
            "kind": STATE_KIND,
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self.position,
            "connection": connection_state,
        }

    state = state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch ``state`` was taken at (before or after the connection opened).

        ``state`` is a :meth:`state_dict`, or a connection's own state (what this method took before datasets had
        their own; the position in the epoch is then its step modulo ``batches``).
        """
        if not isinstance(state, dict):
            raise StateError(f"a ConnectionDataset state must be a dict. Found: {str(state)[:200]}")
        if state.get("kind") == STATE_KIND:
            if state.get("format") != STATE_FORMAT:
                raise StateError(
                    f"ConnectionDataset state format must be {STATE_FORMAT}. Found: {state.get('format')!r}"
                )
            epoch, position = (_count_in(state, name) for name in ("epoch", "position"))
            connection_state = state.get("connection")
            if not isinstance(connection_state, dict):
                raise StateError(f"the state lacks its connection state. Found: {connection_state!r}")
        else:
            connection_state = state
            step = _step_in(state)
            epoch, position = (0, 0) if self.batches is None or step is None else divmod(step, self.batches)
        self.epoch = epoch
        self.position = position if self.batches is None else min(position, self.batches)
        self._restored = True
        self._jumped = False
        self._pending_move = None
        self._next_step = _step_in(connection_state)
        if self.connection is None:
            self._pending_state = connection_state
        else:
            self._pending_state = None
            self.connection.load_state_dict(connection_state)

    load_state = set_state = load_state_dict

    def close(self) -> None:
        """Close the connection (if this dataset opened it, or was given it)."""
        self.transfer.synchronize()
        if self.connection is not None:
            self.connection.close()
            self.connection = None if self.urls is not None else self.connection

    def __enter__(self) -> ConnectionDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _count_in(state: dict[str, Any], name: str) -> int:
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"the state's {name} must be an int >= 0. Found: {value!r}")
    return value


def _step_in(state: dict[str, Any]) -> int | None:
    """The absolute step of the batch after a connection's ``state``, when it says."""
    step = state.get("step")
    if step is None and isinstance(state.get("pipeline"), dict):
        step = state["pipeline"].get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC images (as the image servers send) to float32 NCHW, normalised, on the images' device.

    Normalising on the trainer (often the GPU) keeps the wire at one byte per pixel. ``channels_last`` returns
    NCHW in channels-last memory format instead of a contiguous copy.
    """
    if images.ndim != 4 or images.shape[-1] != len(mean):
        raise ConfigError(f"images must be (N, H, W, {len(mean)}). Found: {tuple(images.shape)}")
    scale = torch.tensor([1 / (255 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=images.device).view(
        1, -1, 1, 1
    )
    planar = images.permute(0, 3, 1, 2).float()
    result = planar * scale - shift
    return result if channels_last else result.contiguous()
