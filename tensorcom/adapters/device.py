"""Move decoded batches onto a torch device.

:class:`DeviceTransfer` turns every numpy array of a batch (nested tuples, lists and dicts) into a torch tensor
that shares the array's memory (``torch.from_numpy``; bfloat16 through :func:`tensorcom.convert.to_torch`) and
moves every tensor to the target device. For a CUDA device it stages the batch in pinned host memory, copies with
``non_blocking=True`` on the current stream, and records one CUDA event per batch; before a new batch is staged
while ``max_batches_on_device`` copies are outstanding, it waits for the oldest, so at most that many batches are
in flight and their pinned staging buffers are reused instead of reallocated.

torch is imported on first use, never when this module is imported.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tensorcom.convert import to_torch
from tensorcom.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceTransfer", "map_tensors"]

logger = logging.getLogger(__name__)


def map_tensors(batch: Any, function: Callable[[Any], Any]) -> Any:
    """Apply ``function`` to every leaf of nested tuples, lists and dicts; other containers are leaves."""
    if isinstance(batch, dict):
        return {key: map_tensors(value, function) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(value, function) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(map_tensors(value, function) for value in batch)
    return function(batch)


class DeviceTransfer:
    """Convert numpy arrays in a batch to torch tensors and move them to ``device``.

    Args:
        device: the target, e.g. ``"cpu"``, ``"cuda:0"`` or a ``torch.device``; None keeps tensors on the host
            (arrays are still converted to tensors).
        to_device: replaces the built-in move; called with each tensor, returns what goes into the batch.
        max_batches_on_device: CUDA only: the most batches whose host-to-device copies may be outstanding.
        pin_memory: stage CUDA copies in pinned host memory; default True for CUDA devices, ignored otherwise.
        non_blocking: asynchronous host-to-device copies (effective with pinned memory).

    Leaves that are neither numpy arrays nor torch tensors (ints, strings, None) pass through unchanged. A
    read-only numpy array is copied once before conversion (torch cannot share memory it may not write).
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        to_device: Callable[[Any], Any] | None = None,
        max_batches_on_device: int = 2,
        pin_memory: bool | None = None,
        non_blocking: bool = True,
    ) -> None:
        if isinstance(max_batches_on_device, bool) or not isinstance(max_batches_on_device, int):
            raise ConfigError(f"max_batches_on_device must be an int. Found: {max_batches_on_device!r}")
        if max_batches_on_device < 1:
            raise ConfigError(f"max_batches_on_device must be >= 1. Found: {max_batches_on_device}")
        if to_device is not None and not callable(to_device):
            raise ConfigError(f"to_device must be callable. Found: {to_device!r}")
        self.to_device = to_device
        self.max_batches_on_device = max_batches_on_device
        self.non_blocking = non_blocking
        self.device: torch.device | None = None
        self._cuda = False
        if device is not None:
            import torch

            try:
                self.device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"device must name a torch device. Found: {device!r}") from exc
            self._cuda = self.device.type == "cuda"
            if self._cuda and not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} was requested but CUDA is not available")
        self.pin_memory = self._cuda if pin_memory is None else bool(pin_memory) and self._cuda
        self._in_flight: collections.deque[tuple[Any, list[torch.Tensor]]] = collections.deque()
        self._free: dict[tuple[Any, tuple[int, ...]], list[torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"DeviceTransfer(device={self.device!s}, max_batches_on_device={self.max_batches_on_device}, "
            f"pin_memory={self.pin_memory}, non_blocking={self.non_blocking})"
        )

    def __call__(self, batch: Any) -> Any:
        """Return the batch with every array as a tensor on the target device."""
        if self.to_device is not None:
            return map_tensors(batch, self._custom_leaf)
        if not self._cuda:
            return map_tensors(batch, self._host_leaf)
        return self._to_cuda(batch)

    def synchronize(self) -> None:
        """Wait for every outstanding host-to-device copy."""
        while self._in_flight:
            self._retire_oldest()

    @property
    def batches_in_flight(self) -> int:
        """How many batches' copies are recorded and not yet known to be complete."""
        return len(self._in_flight)

    def _custom_leaf(self, leaf: Any) -> Any:
        tensor = _as_tensor(leaf)
        if tensor is None:
            return leaf
        return self.to_device(tensor)  # type: ignore[misc]

    def _host_leaf(self, leaf: Any) -> Any:
        tensor = _as_tensor(leaf)
        if tensor is None or self.device is None:
            return tensor if tensor is not None else leaf
        return tensor.to(self.device, non_blocking=self.non_blocking)

    def _to_cuda(self, batch: Any) -> Any:
        import torch

        while self._in_flight and self._in_flight[0][0].query():
            self._retire_oldest()
        while len(self._in_flight) >= self.max_batches_on_device:
            self._retire_oldest()
        staged: list[torch.Tensor] = []

        def move(leaf: Any) -> Any:
            if isinstance(leaf, np.ndarray):
                if self.pin_memory:
                    host = self._staging(leaf)
                    staged.append(host)
                else:
                    host = _as_tensor(leaf)
            elif isinstance(leaf, torch.Tensor):
                host = leaf
            else:
                return leaf
            return host.to(self.device, non_blocking=self.non_blocking)

        result = map_tensors(batch, move)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._in_flight.append((event, staged))
        return result

    def _staging(self, array: np.ndarray) -> torch.Tensor:
        """A pinned host tensor holding a copy of ``array``, reused from a finished batch where possible."""
        import torch

        source = to_torch(array) if array.flags.writeable else None
        dtype = source.dtype if source is not None else to_torch(np.empty(0, array.dtype)).dtype
        key = (dtype, tuple(array.shape))
        pool = self._free.get(key)
        host = pool.pop() if pool else torch.empty(array.shape, dtype=dtype, pin_memory=True)
        if source is not None:
            host.copy_(source)
        else:
            _numpy_view(host).reshape(array.shape)[...] = array.view(_numpy_view(host).dtype)
        return host

    def _retire_oldest(self) -> None:
        event, staged = self._in_flight.popleft()
        event.synchronize()
        for host in staged:
            self._free.setdefault((host.dtype, tuple(host.shape)), []).append(host)


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _as_tensor(leaf: Any) -> Any:
    """A torch tensor for a numpy array (sharing memory where it may), the tensor itself, or None."""
    if isinstance(leaf, np.ndarray):
        if not leaf.flags.writeable:
            leaf = leaf.copy()
        return to_torch(leaf)
    import torch

    if isinstance(leaf, torch.Tensor):
        return leaf
    return None
