"""Model Stock (Jang et al. 2024): move from the base toward the children's mean, by how aligned they are."""

import itertools

import torch

from merge_core.methods.spec import MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    children = [inputs.tensors[index] for index in inputs.others()]
    if inputs.shared["filter_wise"]:
        # One interpolation factor per row (a 1-D tensor is one row).
        flat_base = base.unsqueeze(0) if base.dim() == 1 else base
        flat_children = [child.unsqueeze(0) if child.dim() == 1 else child for child in children]
    else:
        flat_base = base.reshape(-1)
        flat_children = [child.reshape(-1) for child in children]

    offsets = [child - flat_base for child in flat_children]
    cosines = [
        ((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for a, b in itertools.combinations(offsets, 2)
    ]
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(flat_children)
    denominator = 1 + (count - 1) * cosine
    # Anti-aligned children leave no finite estimate: keep the base there instead of blowing up.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))
    average = sum(flat_children) / count
    return (t * average + (1 - t) * flat_base).reshape(base.shape)


METHOD = MergeMethod(
    name="model_stock",
    merge=merge,
    params=(Param("filter_wise", per_model=False, default=False),),
    base="required",
    min_models=3,
    ignored_params=("weight",),  # model stock derives each model's share from the angles between them
)
