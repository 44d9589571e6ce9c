"""``Conveyer``: a source followed by transforms, run in the calling thread.

``Conveyer([source, stage, stage, ...])``: the source is a pipeline (``Range``, ``Permutation``, ``Join``, another
``Conveyer``, a built ``PipelineBuilder`` pipeline), a sequence (random access, O(1) skip) or any iterable
(resumed by replay). Every later element is a transform (``Partition``, ``Map``, ``DistributedBatchedMap``,
``Collate``), each instance used in one pipeline only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tensorcom.errors import ConfigError
from tensorcom.pipeline._base import Pipeline, Record, Stage, Transform
from tensorcom.pipeline.sources import as_stage

__all__ = ["Conveyer"]


class Conveyer(Pipeline):
    """A chain of stages; iterate it, or call it, for the next item."""

    def __init__(self, stages: Iterable[Any]) -> None:
        stages = list(stages)
        if not stages:
            raise ConfigError("Conveyer needs at least a source. Found: []")
        if isinstance(stages[0], Transform):
            raise ConfigError(f"the first stage must be a source, not {stages[0].stage_name}")
        chain: list[Stage] = [as_stage(stages[0])]
        for i, stage in enumerate(stages[1:], start=1):
            if not isinstance(stage, Transform):
                raise ConfigError(
                    f"stage {i} must be a transform (Partition, Map, DistributedBatchedMap, Collate). Found: {stage!r}"
                )
            stage._bind(chain[-1])
            chain.append(stage)
        self._stages = chain
        self._last_stage = chain[-1]

    @property
    def stages(self) -> list[Stage]:
        return list(self._stages)

    def _pull(self) -> Record:
        return self._last_stage._pull()

    def _skip(self, n: int) -> None:
        self._last_stage._skip(n)

    def _get_state(self) -> dict[str, Any]:
        return self._last_stage._get_state()

    def _set_state(self, state: Any) -> None:
        self._last_stage._set_state(state)

    def _set_epoch(self, epoch: int) -> None:
        self._last_stage._set_epoch(epoch)

    def _remaining(self) -> float | None:
        return self._last_stage._remaining()

    def _config(self) -> dict[str, Any]:
        return self._last_stage._config()

    def _close(self) -> None:
        for stage in reversed(self._stages):
            stage._close()
