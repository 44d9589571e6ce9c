"""Warm start: a consumer's first batches computed in its own process while its server and workers start.

Spawning the consumer's server process and its worker processes takes a few tenths of a second (each imports numpy,
zmq and tensorcom afresh), while DataLoader forks its workers in milliseconds. Every batch is a pure function of
(seed, epoch, consumer, step), so nothing needs those processes to compute the first ones: :class:`WarmStart` runs
the very pipeline the workers run (:func:`~tensorcom.loader._pipeline.swift_pipeline`, all in-process stages) in the
training process and hands out its batches, numbered, with the metadata and the connection state the server would
give, until the server says it is ready. The consumer then opens its ``zreq`` connection at :meth:`handover_state`,
the exact position after the last batch computed here, and the stream goes on from the workers.

Batches go through the same ``.ten`` encoding and decoding as the wire's (views, no copy), so a warm batch is the
server's batch bit for bit, arrays' dtypes and layout included. States follow the connection's rules (see
``tensorcom.client.request``): after a failed step the state still names the last good batch, one step further.
"""

from __future__ import annotations

from typing import Any

from tensorcom import codec
from tensorcom.client import BatchInfo
from tensorcom.errors import RemoteError, StateError
from tensorcom.loader._pipeline import PipelineSpec, swift_pipeline
from tensorcom.pipeline import Conveyer
from tensorcom.protocol import flatten_batch, rebuild_batch

__all__ = ["WARM_ENDPOINT", "WarmStart"]

WARM_ENDPOINT = "in process (warm start)"
_CONNECTION_STATE_KIND = "tensorcom.zreq"  # tensorcom.client.request's STATE_KIND and format
_CONNECTION_STATE_FORMAT = 2


class WarmStart:
    """Batches of consumer ``rank`` computed here, from a connection ``state`` (or the stream's start)."""

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        seed: int,
        rank: int,
        world_size: int,
        state: dict[str, Any] | None = None,
        pipeline: Conveyer | None = None,
        first: tuple[Any, dict[str, Any]] | None = None,
    ) -> None:
        """``pipeline`` and ``first`` (its first item, already computed): the validation's, when it fits."""
        self.seed = seed
        self.count = 0
        self._pipeline = pipeline or swift_pipeline(seed=seed, rank=rank, world_size=world_size, spec=spec)
        self._origin = self._pipeline.state()
        self._first = first
        self._fingerprint = self._pipeline.fingerprint
        self._base_state: Any = None
        self._base_epoch: int | None = None
        self._base_step = 0
        self._next = 0
        self._state: Any = None
        self._last_epoch: int | None = None
        if state is not None:
            self.load_state(state)

    # -- positions, as the connection keeps them --------------------------------------------------------------

    def _restart(
        self, *, state: Any = None, epoch: int | None = None, base_step: int = 0, first: int = 0
    ) -> None:
        self._first = None
        self._pipeline.load_state(self._origin if state is None else state)  # also sets the pipeline's step
        if state is None and epoch is not None:
            self._pipeline.set_epoch(epoch)
        if first:
            self._pipeline.skip(first)
        self._base_state, self._base_epoch, self._base_step = state, epoch, base_step
        self._next, self._state = first, None

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a connection state (what ``RequestConnection.state()`` returns, or :meth:`state`)."""
        if not isinstance(state, dict) or state.get("kind") != _CONNECTION_STATE_KIND:
            raise StateError(f"not a zreq connection state. Found: {str(state)[:200]}")
        if state.get("seed") != self.seed:
            raise StateError(
                f"the state was saved with seed {state.get('seed')!r}; this loader has seed {self.seed}"
            )
        fingerprint = state.get("fingerprint")
        if fingerprint not in (None, self._fingerprint):
            raise StateError(
                f"the state was saved from pipeline {fingerprint}; this loader's pipeline is {self._fingerprint}"
            )
        pipeline, epoch, step = state.get("pipeline"), state.get("epoch"), _step_of(state)
        if pipeline is None:
            self._restart(epoch=epoch, first=step)
        else:
            self._restart(state=pipeline, epoch=epoch, base_step=step)

    def state(self) -> dict[str, Any]:
        """The connection state after the last batch handed out (the same as the server path would report)."""
        return {
            "kind": _CONNECTION_STATE_KIND,
            "format": _CONNECTION_STATE_FORMAT,
            "seed": self.seed,
            "fingerprint": self._fingerprint,
            "pipeline": self._state if self._state is not None else self._base_state,
            "epoch": None if self._state is not None else self._base_epoch,
            "step": self._base_step + self._next,
        }

    def handover_state(self) -> dict[str, Any]:
        """Where a connection continues exactly: after the last step computed here (failed ones included)."""
        return {**self.state(), "pipeline": self._pipeline.state(), "epoch": None}

    # -- batches ----------------------------------------------------------------------------------------------

    def next(self) -> tuple[Any, BatchInfo]:
        """The next batch, as the connection would deliver it, and its BatchInfo. StopIteration at the end of an
        epoch (then the next call starts the next epoch); a failed step raises :class:`RemoteError` (its cause the
        original exception) and is passed, as on the server path."""
        step = self._base_step + self._next
        if self._first is not None:
            packed, meta = self._first
            self._first = None
        else:
            try:
                packed, meta = self._pipeline.next_with_meta()
            except StopIteration:
                epoch = self._last_epoch
                if epoch is None:
                    epoch = self._base_epoch if self._base_epoch is not None else _epoch_in(self._base_state)
                self._restart(epoch=(epoch or 0) + 1)
                self._last_epoch = None
                raise
            except Exception as exc:  # reported as the server reports it; the stream goes on after this step
                self._next += 1
                raise RemoteError(
                    f"{WARM_ENDPOINT} failed at step {step}: {type(exc).__name__}: {exc}"
                ) from exc
        self._next += 1
        self._state = self._pipeline.state()
        self._last_epoch = int(meta.get("epoch", 0))
        arrays, shape = flatten_batch(packed)
        decoded, infos = codec.decode(codec.encode(arrays), infos=True)
        self.count += 1
        info = BatchInfo(
            endpoint=WARM_ENDPOINT,
            nbytes=sum(a.nbytes for a in decoded),
            infos=infos,
            count=self.count,
            step=step,
            epoch=self._last_epoch,
            indices=[int(i) for i in meta.get("indices", [])],
        )
        return rebuild_batch(decoded, **shape), info

    def close(self) -> None:
        self._pipeline.close()


def _step_of(state: dict[str, Any]) -> int:
    step = state.get("step")
    if step is None:
        pipeline = state.get("pipeline")
        step = pipeline.get("step") if isinstance(pipeline, dict) else 0
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StateError(f"the state's step must be an int >= 0. Found: {step!r}")
    return step


def _epoch_in(state: Any) -> int | None:
    """The first ``epoch`` found in a pipeline state (its source's), or None."""
    if isinstance(state, dict):
        if isinstance(state.get("epoch"), int):
            return int(state["epoch"])
        values: Any = state.values()
    elif isinstance(state, list):
        values = state
    else:
        return None
    for value in values:
        found = _epoch_in(value)
        if found is not None:
            return found
    return None
