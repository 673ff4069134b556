"""SLERP between the base (t = 0) and the one other model (t = 1), each tensor flattened whole.

The cosine between the two tensors does not depend on t, so `prepare` computes it once per tensor pair.
Math is in fp32 (fp64 for fp64 inputs), in 1M-element chunks like mergekit: the chunked norm and dot sums
round differently from one whole-tensor reduction, and bit-equality needs the same rounding.
"""

import torch

from merge_core.methods.spec import MergeInputs, MergeMethod, Param

CHUNK = 1024 * 1024
LERP_ABOVE = 0.9995  # |cos| beyond which the arc is too flat for sin(theta) to divide by


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunks(row: torch.Tensor) -> list[slice]:
    return [slice(start, start + CHUNK) for start in range(0, row.shape[1], CHUNK)]


def _norm(row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    parts = [torch.linalg.vector_norm(row[:, part].to(dtype), dim=1, keepdim=True) for part in _chunks(row)]
    norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(norm > 1e-8, norm, 1)


def _ordered_pair(tensors: list[torch.Tensor], base_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    base, other = tensors[base_index], tensors[1 - base_index]
    return base.reshape(1, -1), other.reshape(1, -1)


def prepare(tensors: list[torch.Tensor], base_index: int | None) -> dict:
    a, b = _ordered_pair(tensors, base_index)
    dtype = _work_dtype(a)
    if a.numel() == 0:
        return {"cosine": torch.ones((1, 1), dtype=dtype, device=a.device)}  # nothing to interpolate
    norm_a, norm_b = _norm(a, dtype), _norm(b, dtype)
    dots = [
        ((a[:, part].to(dtype) / norm_a) * (b[:, part].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
        for part in _chunks(a)
    ]
    return {"cosine": torch.stack(dots).sum(dim=0).clamp(-1, 1)}


def merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    a, b = _ordered_pair(inputs.tensors, inputs.base_index)
    dtype = _work_dtype(a)
    cosine = (inputs.prepared or prepare(inputs.tensors, inputs.base_index))["cosine"]
    # t travels as an fp32 tensor in mergekit, so 1 - t and t * theta round in fp32.
    t = torch.tensor([[inputs.shared["t"]]], dtype=dtype, device=a.device)
    flat = cosine.abs() > LERP_ABOVE
    theta = torch.acos(torch.where(flat, 0, cosine))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(flat, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(flat, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for part in _chunks(a):
        result[:, part] = coef_a * a[:, part].to(dtype) + coef_b * b[:, part].to(dtype)
    return result.reshape(base.shape)


METHOD = MergeMethod(
    name="slerp",
    merge=merge,
    params=(Param("t", per_model=False),),
    base="required",
    min_models=2,
    max_models=2,
    prepare=prepare,
    ignored_params=("embed_slerp",),
)
