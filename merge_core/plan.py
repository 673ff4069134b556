"""The merge planner: every output tensor of a recipe, the input tensors it is merged from, and the value of
every method parameter for it, resolved by mergekit 0.1.5's rules.

Output order is mergekit's: pre-weights, then each output slice's layers, numbered on across slices (slices
stack), then post-weights. Pre-weights are merged from the first slice's inputs with its parameters,
post-weights from the last slice's; both at t = 0. Layer `offset` of an L-layer slice is at
t = offset / (L - 1), or t = 1 when L = 1. Per-model values are looked up slice source > slice > top level >
method default, their filters matched against the input tensor's name; shared values slice > top level >
default, matched against the output tensor's name.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core import architecture
from merge_core.errors import InputError
from merge_core.methods import MergeMethod
from merge_core.parameters import Scalar, resolve
from merge_core.recipe import OutputSlice, Recipe, SliceInput
from merge_core.tokenizer_merge import VocabularySettings


@dataclass(frozen=True)
class TensorJob:
    out_name: str
    sources: tuple[tuple[str, str], ...]  # (model ref, input tensor name) in mergekit's merge order, base included
    base_index: int | None  # position of base_model in `sources`, None when it is not an input
    # Every per-model parameter, one value per source. The base's entry is None when the method uses a base:
    # mergekit never reads per-model values for it (they only weight the other models' task vectors).
    per_model: dict[str, tuple[Scalar | None, ...]]
    shared: dict[str, Scalar]  # every shared parameter


@dataclass(frozen=True)
class MergePlan:
    method: MergeMethod
    jobs: tuple[TensorJob, ...]  # in output order
    num_hidden_layers: int  # output depth: the sum of the slices' lengths
    models: tuple[str, ...]  # every model read, in merge input order
    base_model: str | None
    dtype: torch.dtype | None  # merge dtype; None keeps the inputs' dtype, as mergekit does
    out_dtype: torch.dtype | None
    # The output vocabulary the token-indexed tensors are aligned to first; None keeps the sources' own.
    vocabulary: VocabularySettings | None = None


def plan_merge(recipe: Recipe, tensor_names: Sequence[str], num_layers: int, where: str | None = None) -> MergePlan:
    """Plan `recipe` over models that all have `tensor_names` and `num_layers` layers."""
    where = recipe.where if where is None else where
    layout = architecture.layout(tensor_names)
    if layout.num_layers != num_layers:
        raise InputError(
            where, None, f"the tensor names hold {layout.num_layers} layers but the model config says {num_layers}"
        )
    pieces = recipe.output_slices()
    for piece in pieces:
        for source in piece.inputs:
            if source.layer_range and source.layer_range[1] > num_layers:
                raise InputError(
                    where,
                    f"{source.path}.layer_range",
                    f"ends at layer {source.layer_range[1]} but {source.model} has {num_layers} layers",
                )

    def job(out_name: str, sources: list[tuple[SliceInput, str]], piece: OutputSlice, t: float) -> TensorJob:
        return _resolve_job(recipe, where, out_name, sources, piece, t)

    first, last = pieces[0], pieces[-1]
    jobs = [job(name, [(source, name) for source in first.inputs], first, 0.0) for name in layout.pre]
    out_layer = 0
    for piece in pieces:
        starts = [source.layer_range[0] if source.layer_range else 0 for source in piece.inputs]
        range_ = piece.inputs[0].layer_range
        length = range_[1] - range_[0] if range_ else num_layers
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for name in layout.layer:
                sources = [
                    (source, architecture.rename_layer(name, start + offset))
                    for source, start in zip(piece.inputs, starts, strict=True)
                ]
                jobs.append(job(architecture.rename_layer(name, out_layer), sources, piece, t))
            out_layer += 1
    jobs += [job(name, [(source, name) for source in last.inputs], last, 0.0) for name in layout.post]

    return MergePlan(
        method=recipe.method,
        jobs=tuple(jobs),
        num_hidden_layers=out_layer,
        models=tuple(dict.fromkeys(source.model for piece in pieces for source in piece.inputs)),
        base_model=recipe.base_model,
        dtype=recipe.merge_dtype,
        out_dtype=recipe.save_dtype,
        vocabulary=VocabularySettings.of(recipe),
    )


def _resolve_job(
    recipe: Recipe, where: str, out_name: str, sources: list[tuple[SliceInput, str]], piece: OutputSlice, t: float
) -> TensorJob:
    method = recipe.method
    base_index = next((i for i, (source, _) in enumerate(sources) if source.model == piece.base_model), None)
    # modules: syntax adds the module's parameters between the slice's and the top level's
    module_level = [(f"{recipe.body[3]}parameters", piece.module_parameters)] if piece.module_parameters else []
    shared = {}
    for param in (param for param in method.params if not param.per_model):
        levels = [(f"{piece.path}.parameters", piece.parameters), *module_level, ("parameters", recipe.parameters)]
        shared[param.name] = _value(param.name, param.default, levels, out_name, t, where, method)
    per_model = {}
    for param in (param for param in method.params if param.per_model):
        values = []
        for index, (source, in_name) in enumerate(sources):
            if index == base_index and method.base != "ignored":
                values.append(None)
                continue
            levels = [
                (f"{source.path}.parameters", source.parameters),
                (f"{piece.path}.parameters", piece.parameters),
                *module_level,
                ("parameters", recipe.parameters),
            ]
            values.append(_value(param.name, param.default, levels, in_name, t, where, method))
        per_model[param.name] = tuple(values)
    return TensorJob(
        out_name=out_name,
        sources=tuple((source.model, in_name) for source, in_name in sources),
        base_index=base_index,
        per_model=per_model,
        shared=shared,
    )


def _value(
    name: str,
    default: Scalar | None,
    levels: list[tuple[str, dict | None]],
    tensor_name: str,
    t: float,
    where: str,
    method: MergeMethod,
) -> Scalar:
    value = resolve(name, (parameters for _, parameters in levels), tensor_name, t)
    if value is None:
        value = default
    if value is None:
        # The recipe check made sure the parameter is set somewhere, so a filter list missed this tensor.
        path = next(path for path, parameters in levels if parameters and name in parameters)
        raise InputError(
            where,
            f"{path}.{name}",
            f"no filter entry matches tensor {tensor_name} and {method.name} has no default: add a {{value: ...}} entry",
        )
    return value
