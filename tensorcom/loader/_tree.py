"""Nested batches as flat arrays for the ``.ten`` codec, and back.

A collated batch can be any nesting of tuples, lists and dicts (string keys) whose leaves are numpy arrays, torch
tensors, numbers, strings, bytes or None. :func:`pack_tree` turns it into a flat dict that the request protocol carries
as it is (``{"0": array, "1": array, ..., TREE_KEY: skeleton}``): the arrays travel as ``.ten`` frames, and the
skeleton (the nesting, which leaves were torch tensors, and the small JSON-able leaves) travels as a uint8 array of
UTF-8 JSON. :func:`unpack_tree` rebuilds the batch, torch tensors included (sharing the received memory). Nothing
is pickled.

Skeleton nodes: ``["T", [children]]`` (tuple), ``["L", [children]]`` (list), ``["D", [[key, child], ...]]``
(dict), ``["A", i, is_torch]`` (array number ``i``), ``["B", i]`` (bytes, sent as uint8 array ``i``),
``["V", value]`` (a JSON value).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorcom.convert import to_torch
from tensorcom.errors import DecodeError, PipelineError

__all__ = ["TIMING_KEY", "TREE_KEY", "pack_tree", "unpack_tree"]

TREE_KEY = "tensorcom.tree"
TIMING_KEY = "tensorcom.timing"

_SCALARS = (str, int, float, bool, type(None))


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _skeleton(value: Any, arrays: list[Any], path: str) -> list[Any]:
    if isinstance(value, np.ndarray | np.generic):
        arrays.append(np.asarray(value))
        return ["A", len(arrays) - 1, False]
    if _is_tensor(value):
        arrays.append(value)
        return ["A", len(arrays) - 1, True]
    if isinstance(value, bytes | bytearray | memoryview):
        arrays.append(np.frombuffer(value, dtype=np.uint8))
        return ["B", len(arrays) - 1]
    if isinstance(value, _SCALARS):
        if isinstance(value, float) and not np.isfinite(value):
            arrays.append(np.asarray(value))
            return ["A", len(arrays) - 1, False]
        return ["V", value]
    if isinstance(value, Mapping):
        children = []
        for key, child in value.items():
            if not isinstance(key, str):
                raise PipelineError(
                    f"batch dicts need string keys to be sent; {path or 'the batch'} has key {key!r}. "
                    "Pass a batch_encoder/batch_decoder pair for other batches"
                )
            children.append([key, _skeleton(child, arrays, f"{path}[{key!r}]")])
        return ["D", children]
    if isinstance(value, tuple | list):
        kind = "T" if isinstance(value, tuple) else "L"
        return [kind, [_skeleton(child, arrays, f"{path}[{i}]") for i, child in enumerate(value)]]
    raise PipelineError(
        f"cannot send {type(value).__name__} at {path or 'the batch'}: batches hold nested tuples, lists and dicts "
        "of arrays, tensors, numbers and strings. Pass a batch_encoder/batch_decoder pair for other batches"
    )


def pack_tree(batch: Any, timing: Any = None) -> dict[str, Any]:
    """Flatten ``batch`` to ``{"0": array, ..., TREE_KEY: skeleton}`` (plus ``TIMING_KEY`` when given)."""
    arrays: list[Any] = []
    skeleton = _skeleton(batch, arrays, "")
    packed: dict[str, Any] = {str(i): array for i, array in enumerate(arrays)}
    text = json.dumps(skeleton, separators=(",", ":"), allow_nan=False).encode("utf-8")
    packed[TREE_KEY] = np.frombuffer(text, dtype=np.uint8)
    if timing is not None:
        packed[TIMING_KEY] = np.asarray(timing, dtype=np.float64)
    return packed


def _build(node: Any, arrays: Mapping[str, Any]) -> Any:
    if not isinstance(node, list) or not node:
        raise DecodeError(f"malformed batch skeleton node: {node!r}")
    kind = node[0]
    if kind == "A" and len(node) == 3:
        array = arrays.get(str(node[1]))
        if array is None:
            raise DecodeError(f"batch skeleton refers to array {node[1]!r}, which the batch does not hold")
        return to_torch(array) if node[2] else array
    if kind == "B" and len(node) == 2:
        data = arrays.get(str(node[1]))
        if data is None:
            raise DecodeError(f"batch skeleton refers to array {node[1]!r}, which the batch does not hold")
        return np.asarray(data).tobytes()
    if kind == "V" and len(node) == 2:
        return node[1]
    if kind in ("T", "L") and len(node) == 2 and isinstance(node[1], list):
        children = [_build(child, arrays) for child in node[1]]
        return tuple(children) if kind == "T" else children
    if kind == "D" and len(node) == 2 and isinstance(node[1], list):
        built = {}
        for entry in node[1]:
            if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
                raise DecodeError(f"malformed dict entry in batch skeleton: {entry!r}")
            built[entry[0]] = _build(entry[1], arrays)
        return built
    raise DecodeError(f"malformed batch skeleton node: {node!r}")


def unpack_tree(packed: Any) -> tuple[Any, np.ndarray | None]:
    """Inverse of :func:`pack_tree`: the batch, and the timing array if the batch carried one."""
    if not isinstance(packed, dict) or TREE_KEY not in packed:
        raise DecodeError(
            f"expected a batch packed by the loader (a dict with {TREE_KEY!r}). Found: {type(packed).__name__}"
        )
    try:
        skeleton = json.loads(bytes(np.asarray(packed[TREE_KEY], dtype=np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"batch skeleton is not valid JSON: {exc}") from None
    timing = packed.get(TIMING_KEY)
    return _build(skeleton, packed), timing
