"""NuSLERP: SLERP of two models (or of their task vectors, when a base is given) at t = w2 / (w1 + w2).

Unlike slerp, the math runs in the merge dtype, and by default over the whole flattened tensor;
with nuslerp_flatten off it runs per row of the last dim, or with nuslerp_row_wise per slice along dim 0.
"""

import torch

from merge_core.errors import InputError
from merge_core.methods.spec import MergeInputs, MergeMethod, Param


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cosine = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cosine))  # finite even where the lerp branch is taken
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def merge(inputs: MergeInputs) -> torch.Tensor:
    others = inputs.others()
    if len(others) != 2:
        raise InputError("nuslerp", "models", f"needs exactly 2 non-base models, got {len(others)} for {inputs.name!r}")
    first, second = (inputs.tensors[index] for index in others)
    weights = [inputs.per_model["weight"][index] for index in others]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    row_wise, flatten = inputs.shared["nuslerp_row_wise"], inputs.shared["nuslerp_flatten"]
    base = inputs.base
    if base is None:
        return nuslerp(t, first, second, row_wise, flatten)
    return base + nuslerp(t, first - base, second - base, row_wise, flatten)


METHOD = MergeMethod(
    name="nuslerp",
    merge=merge,
    params=(
        Param("weight", per_model=True),
        Param("nuslerp_row_wise", per_model=False, default=False),
        Param("nuslerp_flatten", per_model=False, default=True),
    ),
    base="optional",
    min_models=2,
    max_models=3,
    non_base_models=2,
)
