"""Deterministic, resumable pipeline stages and the pipeline builder (no zmq; torch only when items are tensors).

Lifecycle and directory map: see ``README.md`` beside this file.
"""

from __future__ import annotations

from tensorcom.pipeline._base import Pipeline, Stage, Transform
from tensorcom.pipeline.builder import BuiltPipeline, PipelineBuilder
from tensorcom.pipeline.collate import Collate, collate
from tensorcom.pipeline.conveyer import Conveyer
from tensorcom.pipeline.join import Join
from tensorcom.pipeline.map import DistributedBatchedMap, Map
from tensorcom.pipeline.partition import Partition
from tensorcom.pipeline.sources import IterableSource, Permutation, Range, SequenceSource

__all__ = [
    "BuiltPipeline",
    "Collate",
    "Conveyer",
    "DistributedBatchedMap",
    "IterableSource",
    "Join",
    "Map",
    "Partition",
    "Permutation",
    "Pipeline",
    "PipelineBuilder",
    "Range",
    "SequenceSource",
    "Stage",
    "Transform",
    "collate",
]
