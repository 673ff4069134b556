"""What a MergeSession keeps resident, in bytes, computed from checkpoint headers without loading a weight.

A session holds (merge_core/session.py):
    sources   every model's tensors, in their own dtype, on the session's device
    casts     each source tensor again in the merge dtype, where that differs from the tensor's own
    prepared  the method's candidate-independent state per tensor (task vectors, magnitude ranks), kept so a
              candidate pays only its own arithmetic
and a search adds one live model to write candidates into. `prepared` is measured, not tabled: the method's
own `prepare` runs on a small tensor of each dtype and its output is counted per element, so a new method
needs no entry here.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.spec import MergeMethod
from merge_core.sources import CheckpointInfo

PROBE_SHAPE = (8, 8)  # small, but 2-D: sparsifiers rank rows of matrices


@dataclass(frozen=True)
class SessionBytes:
    sources: int
    casts: int
    prepared: int
    # The most casts + prepared state of any one tensor: what a lean session (which keeps neither) holds at
    # once while it merges that tensor.
    largest_tensor: int


def tensor_bytes(info: CheckpointInfo, dtype: torch.dtype | None = None) -> int:
    """One checkpoint's weights in `dtype` (None: each tensor's own)."""
    return sum(math.prod(shape) * (dtype or info.dtypes[name]).itemsize for name, shape in info.shapes.items())


def session_bytes(
    infos: Sequence[CheckpointInfo], method: MergeMethod, merge_dtype: torch.dtype | None, base: str
) -> SessionBytes:
    """What a session that loaded `infos` keeps resident once every tensor has been merged once. `base`: the
    base model's ref, loaded even where the method ignores it (a search's live model is built from it)."""
    uses_base = method.base != "ignored"
    merged = [info for info in infos if uses_base or info.ref != base]
    others = len(merged) - uses_base  # the models a task vector is taken of
    per_element: dict[torch.dtype, float] = {}  # prepared bytes per element, by merge dtype
    casts = prepared = largest = 0
    for name, shape in infos[0].shapes.items():
        count = math.prod(shape)
        cast = sum(
            count * merge_dtype.itemsize
            for info in merged
            if merge_dtype is not None and info.dtypes[name] != merge_dtype
        )
        state = 0
        if method.prepare is not None:
            dtype = merge_dtype or infos[0].dtypes[name]
            if dtype not in per_element:
                per_element[dtype] = prepared_bytes_per_element(method, dtype, others)
            state = round(count * per_element[dtype])
        casts, prepared, largest = casts + cast, prepared + state, max(largest, cast + state)
    return SessionBytes(sum(tensor_bytes(info) for info in infos), casts, prepared, largest)


def prepared_bytes_per_element(method: MergeMethod, dtype: torch.dtype, others: int) -> float:
    """Bytes `method.prepare` keeps per element of one tensor, for a base and `others` other models."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(PROBE_SHAPE, generator=generator).to(dtype) for _ in range(others + 1)]
    return _bytes(method.prepare(tensors, 0)) / math.prod(PROBE_SHAPE)


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_bytes(item) for item in value)
    return 0
