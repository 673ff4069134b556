"""The task-arithmetic family, written once: task vectors, optional sparsification, optional sign consensus.

    delta_i = sparsify(M_i - B) * w_i
    mixed   = sum_i delta_i [where sign(delta_i) agrees with sign(sum_i delta_i)]      (consensus)
    out     = B + lambda * mixed / [sum of the weights that contributed]              (normalize)

ties, dare_*, breadcrumbs*, della* and task_arithmetic differ only in the sparsifier, the consensus switch
and two defaults. Every operation runs in the merge dtype on the same tensor shapes as mergekit 0.1.5, since
bf16 results depend on where the rounding happens (e.g. the stacked sum rounds once, a chain of adds does not).
"""

import torch

from merge_core.methods.sparsify import Sparsifier
from merge_core.methods.spec import MergeInputs, MergeMethod, Param


def _task_vectors(tensors: list[torch.Tensor], base_index: int) -> torch.Tensor:
    base = tensors[base_index]
    deltas = [tensor - base for index, tensor in enumerate(tensors) if index != base_index]
    return torch.stack(deltas) if deltas else base.new_empty((0, *base.shape))


def _prepare(sparsifier: Sparsifier | None):
    def prepare(tensors: list[torch.Tensor], base_index: int | None) -> dict:
        deltas = _task_vectors(tensors, base_index)
        ranks = [sparsifier.rank(delta) for delta in deltas] if sparsifier and sparsifier.rank else None
        return {"deltas": deltas, "ranks": ranks}

    return prepare


def _merge(sparsifier: Sparsifier | None, sign_consensus: bool):
    def merge(inputs: MergeInputs) -> torch.Tensor:
        base, others = inputs.base, inputs.others()
        if not others:
            return base
        prepared = inputs.prepared or {"deltas": _task_vectors(inputs.tensors, inputs.base_index), "ranks": None}
        deltas = prepared["deltas"]
        if sparsifier:
            extra = inputs.per_model[sparsifier.extra.name] if sparsifier.extra else [0.0] * len(inputs.tensors)
            ranks = prepared["ranks"] or [None] * len(others)
            deltas = torch.stack(
                [
                    sparsifier.sparsify(
                        deltas[row],
                        inputs.per_model["density"][index],
                        extra[index],
                        inputs.shared["rescale"],
                        ranks[row],
                        inputs.generator,
                    )
                    for row, index in enumerate(others)
                ]
            )
        weights = torch.tensor(
            [inputs.per_model["weight"][index] for index in others], dtype=base.dtype, device=base.device
        )
        weights = weights.reshape(-1, *[1] * base.dim())
        deltas = deltas * weights

        if sign_consensus:
            # TIES "sum" election: the sign of the summed weighted deltas wins; mergekit's int8_mask only
            # changes the dtype this comparison is made in, never its outcome.
            majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
            agrees = deltas.sign() == majority
            mixed = (deltas * agrees).sum(dim=0)
            divisor = (weights * agrees).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1

        if inputs.shared["normalize"]:
            mixed /= divisor
        if inputs.shared["lambda"] != 1:
            mixed *= inputs.shared["lambda"]
        return (base + mixed).to(base.dtype)

    return merge


def task_arithmetic_method(
    name: str,
    sparsifier: Sparsifier | None,
    sign_consensus: bool,
    normalize: bool,
    rescale: bool,
) -> MergeMethod:
    """One member of the family; `normalize` and `rescale` are its defaults (a recipe may override both)."""
    params = (
        Param("weight", per_model=True),
        Param("density", per_model=True, default=1.0, inert=sparsifier is None),
        Param("normalize", per_model=False, default=normalize),
        Param("rescale", per_model=False, default=rescale),
        Param("lambda", per_model=False, default=1.0),
        Param("int8_mask", per_model=False, default=False, inert=True),  # mergekit's memory knob
    )
    if sparsifier and sparsifier.extra:
        params += (sparsifier.extra,)
    return MergeMethod(
        name=name,
        merge=_merge(sparsifier, sign_consensus),
        params=params,
        base="required",
        min_models=1,
        random=bool(sparsifier and sparsifier.random),
        prepare=_prepare(sparsifier),
        elementwise=sparsifier is None,  # sign consensus and the normalization are per element
    )
