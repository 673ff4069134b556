"""Linear (model soup, Wortsman et al. 2022): a weighted average of the inputs; any base is just an input."""

import torch

from merge_core.methods.spec import MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs) -> torch.Tensor:
    first = inputs.tensors[0]
    # Accumulate in fp32 even for bf16/fp16 inputs (fp64 stays fp64), in input order, as mergekit does.
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(inputs.per_model["weight"], dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(inputs.tensors, weights, strict=True):
        result.addcmul_(tensor, weight)
    if inputs.shared["normalize"]:
        # No guard: weights summing to zero give inf/nan, exactly like mergekit.
        result.div_(weights.sum())
    return result.to(first.dtype)


METHOD = MergeMethod(
    name="linear",
    merge=merge,
    params=(Param("weight", per_model=True), Param("normalize", per_model=False, default=True)),
    base="ignored",
    min_models=1,
    elementwise=True,
)
