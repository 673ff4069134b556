"""Passthrough: copy the single input tensor, optionally scaled; stacking layer slices is the planner's job."""

import torch

from merge_core.methods.spec import MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs) -> torch.Tensor:
    (tensor,) = inputs.tensors
    (scale,) = inputs.per_model["scale"]
    return tensor if scale == 1 else tensor * scale


METHOD = MergeMethod(
    name="passthrough",
    merge=merge,
    # Per-model, as in mergekit (PerInput): frankenmerges set it per slice source, e.g. to zero o_proj.
    params=(Param("scale", per_model=True, default=1.0),),
    base="ignored",
    min_models=1,
    max_models=1,
    elementwise=True,
)
