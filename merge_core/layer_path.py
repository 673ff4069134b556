"""Layer paths: the order in which a token passes through layers taken from several models (data-flow space).

A path is a list of slots, each one layer of one source model with a scale on its contribution to the
residual stream. Its recipe is mergekit's passthrough frankenmerge: runs of consecutive layers of one model at
one scale become one slice, and a scale other than 1 is a passthrough `scale` on the layer's output projections
(attention o_proj and MLP down_proj, weights and biases). A decoder layer adds s * attn(...) and s * mlp(...)
to the residual when those two projections are scaled by s, so the scale means "how much this layer writes",
and `mergekit-yaml` reproduces it exactly. Embeddings come from the first slot's model and the final norm and
head from the last one's, as mergekit takes them from the first and last slices.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from merge_core.errors import InputError
from merge_core.parameters import Filtered
from merge_core.recipe import Recipe

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # the projections that write into the residual stream


@dataclass(frozen=True)
class Slot:
    model: str
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerPath:
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        if not self.slots:
            raise ValueError("a layer path needs at least one slot")

    def __len__(self) -> int:
        return len(self.slots)

    def runs(self) -> list[tuple[str, int, int, float]]:
        """(model, first layer, end layer (excluded), scale) for each run of consecutive layers of one model
        at one scale: one passthrough slice each."""
        runs: list[list] = []
        for slot in self.slots:
            last = runs[-1] if runs else None
            if last and (last[0], last[2], last[3]) == (slot.model, slot.layer, slot.scale):
                last[2] += 1
            else:
                runs.append([slot.model, slot.layer, slot.layer + 1, slot.scale])
        return [tuple(run) for run in runs]

    def recipe_dict(self, dtype: str | None = None) -> dict:
        slices = []
        for model, start, end, scale in self.runs():
            source = {"model": model, "layer_range": [start, end]}
            if scale != 1.0:
                entries = [{"filter": name, "value": float(scale)} for name in RESIDUAL_OUTPUTS]
                source["parameters"] = {"scale": [*entries, {"value": 1.0}]}
            slices.append({"sources": [source]})
        recipe = {"merge_method": "passthrough", "slices": slices}
        return recipe | ({"dtype": dtype} if dtype else {})

    def recipe(self, dtype: str | None = None) -> Recipe:
        return Recipe.from_dict(self.recipe_dict(dtype), where="<layer path>")

    def describe(self, label=lambda model: model) -> str:
        """One line, e.g. 'rev 0-1, srt 1 ×0.8, rev 0': what MLflow and the report show for a trial."""
        parts = []
        for model, start, end, scale in self.runs():
            layers = f"{start}" if end - start == 1 else f"{start}-{end - 1}"
            parts.append(f"{label(model)} {layers}" + ("" if scale == 1.0 else f" ×{scale:.3g}"))
        return ", ".join(parts)

    @classmethod
    def of(cls, recipe: Recipe) -> "LayerPath | None":
        """The path a recipe stacks, or None when it is not one: a passthrough over slices of one source each,
        scaled (if at all) as recipe_dict writes it. Other frankenmerges are merged the ordinary way."""
        if recipe.merge_method != "passthrough" or recipe.slices is None or recipe.parameters:
            return None
        slots = []
        for piece in recipe.slices:
            if len(piece.sources) != 1 or piece.parameters:
                return None
            (source,) = piece.sources
            scale = _scale(source.parameters)
            if scale is None:
                return None
            start, end = source.layer_range
            slots += [Slot(source.model, layer, scale) for layer in range(start, end)]
        return cls(tuple(slots))


def _scale(parameters) -> float | None:
    """The one residual scale `parameters` stand for, or None when they say anything else."""
    if not parameters:
        return 1.0
    value = parameters.get("scale") if set(parameters) == {"scale"} else None
    if isinstance(value, int | float):
        return None  # a scale on every tensor (norms too) is not a residual scale
    entries = list(value or [])
    if not all(isinstance(entry, Filtered) for entry in entries):
        return None  # a gradient
    if len(entries) != len(RESIDUAL_OUTPUTS) + 1 or entries[-1].filter is not None or entries[-1].value != 1.0:
        return None
    values = {entry.filter: entry.value for entry in entries[:-1]}
    if set(values) != set(RESIDUAL_OUTPUTS) or len(set(values.values())) != 1:
        return None
    scale = next(iter(values.values()))
    return float(scale) if isinstance(scale, int | float) and not isinstance(scale, bool) else None


def check_path_architecture(tensor_names: Sequence[str], where: str, field: str) -> None:
    """A path scale needs both residual projections in every layer; refuse a model that lacks them."""
    for name in RESIDUAL_OUTPUTS:
        if not any(name in tensor and ".0." in tensor for tensor in tensor_names):
            raise InputError(
                where,
                field,
                f"expected layers whose residual outputs are named {' and '.join(RESIDUAL_OUTPUTS)} (Llama, "
                f"Mistral, Qwen, Gemma), found no {name!r} tensor in layer 0",
            )
