"""PyTorch adapter: a tensorcom Connection as an ``IterableDataset`` for ``DataLoader(dataset, batch_size=None)``.

::

    dataset = ConnectionDataset("zreq://data1:7880", seed=17, device="cuda:0", batches=1000)
    loader = DataLoader(dataset, batch_size=None)       # the servers batch; no re-batching, no loader workers
    for images, labels in loader:                        # torch tensors on cuda:0
        ...
    checkpoint["data"] = dataset.state_dict()            # resume: ConnectionDataset(..., state=checkpoint["data"])

Batches arrive as numpy arrays sharing the received frames' memory; :class:`tensorcom.adapters.device.DeviceTransfer` turns
them into tensors without copying and moves them to ``device`` (pinned staging, non-blocking copies and at most
``max_batches_on_device`` batches in flight for CUDA). The servers do the decoding, so the ``DataLoader`` needs no
worker processes: with ``num_workers > 1`` every worker would open its own connection, and for a zreq stream each
would receive the same batches, so that is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.data

from tensorcom.adapters.device import DeviceTransfer
from tensorcom.client._base import adapter_source
from tensorcom.datasets.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tensorcom.errors import ConfigError

__all__ = ["ConnectionDataset", "normalize_images"]


class ConnectionDataset(torch.utils.data.IterableDataset):
    """Iterate the batches of a tensorcom :class:`~tensorcom.Connection` as torch tensors.

    Args:
        source: URLs (the connection opens on first iteration, in the process that iterates) or an open
            ``Connection`` (used as it is; only with ``num_workers=0``).
        batches: batches per iteration (then ``len(dataset)`` is defined); None iterates until the stream ends
            (a non-repeating zreq epoch) or forever.
        device, to_device, max_batches_on_device, pin_memory, non_blocking: see :class:`DeviceTransfer`.
        transform: applied to each batch after the device transfer (e.g. :func:`normalize_images` on the images).
        connection_options: passed to ``Connection`` (seed, rank, world_size, state, prefetch, timeout, ...).
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
        self._pending_state: dict[str, Any] | None = None
        self._last: Any = None

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("this ConnectionDataset has no length; pass batches=N to give it one")
        return self.batches

    def _connect(self) -> Any:
        if self.connection is None:
            from tensorcom.client import Connection

            options = dict(self.connection_options)
            if self._pending_state is not None:
                options["state"] = self._pending_state
                self._pending_state = None
            self.connection = Connection(self.urls or [], **options)
        return self.connection

    def _check_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        if self.urls is None:
            raise ConfigError(
                "an open Connection cannot be shared with DataLoader workers; pass URLs instead"
            )
        if info.num_workers > 1 and any(url.startswith("zreq") for url in self.urls):
            raise ConfigError(
                f"DataLoader(num_workers={info.num_workers}) would give every worker the same zreq stream; "
                "use num_workers=0 (the servers do the decoding)"
            )

    def __iter__(self) -> Iterator[Any]:
        self._check_worker()
        connection = self._connect()
        produced = 0
        while self.batches is None or produced < self.batches:
            try:
                batch = connection.recv()
                self._last = connection.last
            except StopIteration:
                return
            batch = self.transfer(batch)
            if self.transform is not None:
                batch = self.transform(batch)
            produced += 1
            yield batch

    @property
    def last(self) -> Any:
        """``connection.last`` of the last batch (step, epoch, sample indices for zreq); None before any."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """The connection's state after the last batch yielded: plain data for a checkpoint."""
        if self.connection is None and self._pending_state is not None:
            return self._pending_state
        return dict(self._connect().state())

    state = state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch ``state`` was taken at (before or after the connection opened)."""
        if self.connection is None:
            self._pending_state = state
        else:
            self.connection.load_state(state)

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
