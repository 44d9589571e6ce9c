"""The internal protocol every stage speaks, and the public face of a runnable pipeline.

Inside a pipeline, items travel as :class:`Record` objects: the user's value plus where it came from (epoch,
dataset indices, the stream's seed, and for mixes the source numbers). Stages pull records from their upstream
(``_pull``), jump ahead without computing (``_skip``), and report the state of the stream *at their output*
(``_get_state``), which is what makes ``skip`` and elastic resume cheap: only sources hold real state, and every
other stage either passes it through or (for prefetching stages) reports the state as of the last item delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from tensorcom.errors import ConfigError, PipelineError
from tensorcom.pipeline.state import STATE_FORMAT, check_state, fingerprint_of

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound="Pipeline")


@dataclass(frozen=True, slots=True)
class Record:
    """One item in flight: ``value`` plus its provenance (``indices`` has one entry per sample it holds)."""

    value: Any
    epoch: int
    indices: tuple[int, ...]
    salt: int = 0
    sources: tuple[int, ...] = ()

    def with_value(self, value: Any) -> Record:
        return Record(value, self.epoch, self.indices, self.salt, self.sources)

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"epoch": self.epoch, "indices": list(self.indices)}
        if self.sources:
            meta["sources"] = list(self.sources)
        return meta


def check_count(n: Any, what: str = "n") -> int:
    """Return ``n`` if it is a non-negative int; raise :class:`ConfigError` otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{what} must be an int >= 0. Found: {n!r}")
    return n


class Stage:
    """A link of a pipeline. Subclasses override the underscored protocol methods."""

    @property
    def stage_name(self) -> str:
        return type(self).__name__

    def _pull(self) -> Record:
        """Return the next record or raise StopIteration."""
        raise NotImplementedError

    def _skip(self, n: int) -> None:
        """Advance ``n`` records; this fallback computes and discards them."""
        for _ in range(n):
            try:
                self._pull()
            except StopIteration:
                return

    def _get_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: Any) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _remaining(self) -> float | None:
        """Records left (``math.inf`` when endless), or None when unknown without reading ahead."""
        return None

    def _set_epoch(self, epoch: int) -> None:
        raise PipelineError(
            f"{self.stage_name} cannot be moved to an epoch; set_epoch needs a Range or Permutation"
        )

    def _close(self) -> None:
        """Release resources (worker processes, threads); the stage may be restarted by a later pull."""


class Transform(Stage):
    """A stage that reads from an upstream stage; bound once by the Conveyer that owns it."""

    _upstream: Stage | None = None

    def _bind(self, upstream: Stage) -> None:
        if self._upstream is not None:
            raise ConfigError(f"{self.stage_name} is already part of a pipeline; create a new stage instance")
        self._upstream = upstream

    @property
    def upstream(self) -> Stage:
        if self._upstream is None:
            raise PipelineError(
                f"{self.stage_name} is not part of a pipeline; put it in a Conveyer after a source"
            )
        return self._upstream

    def _get_state(self) -> dict[str, Any]:
        return self.upstream._get_state()

    def _set_state(self, state: Any) -> None:
        self.upstream._set_state(state)

    def _set_epoch(self, epoch: int) -> None:
        self.upstream._set_epoch(epoch)

    def _own_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {"kind": "Chain", "upstream": self.upstream._config(), "stage": self._own_config()}


class Pipeline(Stage):
    """Public face of anything that can run alone: iteration, state, skip, fingerprint and clean shutdown.

    ``next(p)`` and ``p()`` return the next item; ``p.next_with_meta()`` also returns where it came from
    (``{"step", "epoch", "indices"}`` and, for mixes, ``"sources"``). ``p.state_dict()`` (alias ``state``) is plain
    data that ``p.load_state_dict()`` (aliases ``load_state``, ``set_state``) restores exactly; ``p.skip(n)``
    advances ``n`` items, computing none of them wherever the stages allow random access.
    """

    _step: int = 0
    _last: Record | None = None
    _fingerprint: str | None = None

    def __next__(self) -> Any:
        try:
            record = self._pull()
        except StopIteration:
            raise
        except Exception:
            # Stages move past a failed item, so the step counter does too: later steps keep their numbers.
            self._step += 1
            self._last = None
            raise
        self._last = record
        self._step += 1
        return record.value

    def __call__(self) -> Any:
        return self.__next__()

    def __iter__(self) -> Iterator[Any]:
        return self

    def next_with_meta(self) -> tuple[Any, dict[str, Any]]:
        """Return the next item and its metadata: step, epoch, dataset indices (and source numbers for mixes)."""
        step = self._step
        value = self.__next__()
        meta = self.last_meta
        meta["step"] = step
        return value, meta

    @property
    def last_meta(self) -> dict[str, Any]:
        """Metadata of the item most recently returned (empty before the first)."""
        if self._last is None:
            return {}
        meta = self._last.meta()
        meta["step"] = self._step - 1
        return meta

    @property
    def last_indices(self) -> list[int]:
        """Dataset indices of the samples in the item most recently returned."""
        return [] if self._last is None else list(self._last.indices)

    @property
    def step(self) -> int:
        """Number of items delivered (or skipped) since the start or since the loaded state's step 0."""
        return self._step

    @property
    def fingerprint(self) -> str:
        """Digest of the configuration that shapes the stream (not worker counts, buffers, rank or world size)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self._config())
        return self._fingerprint

    def state(self) -> dict[str, Any]:
        """Plain, small, rank-independent data from which ``load_state`` continues exactly here."""
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "step": self._step,
            "stream": self._get_state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a state saved by ``state()`` of an identically configured pipeline."""
        checked = check_state(state, self.fingerprint, type(self).__name__)
        self._set_state(checked["stream"])
        self._step = int(checked["step"])
        self._last = None

    set_state = load_state

    def state_dict(self) -> dict[str, Any]:
        """The same as :meth:`state`: the checkpoint name every face of tensorcom answers to."""
        return self.state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The same as :meth:`load_state`."""
        self.load_state(state)

    def skip(self, n: int) -> None:
        """Advance ``n`` items without computing them where the stages allow random access."""
        check_count(n)
        self._skip(n)
        self._step += n

    def set_epoch(self, epoch: int) -> None:
        """Restart the stream at position 0 of ``epoch`` (the source must be a Range or Permutation)."""
        check_count(epoch, "epoch")
        self._set_epoch(epoch)

    def close(self) -> None:
        """Stop worker processes and threads; safe to call more than once."""
        self._close()

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
