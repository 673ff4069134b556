"""The data-flow genome: which layers, of which models, in what order a token passes through.

Layout (Sakana's evolutionary merge, laid out layer by layer). The slots are every layer of every path model,
depth first: (layer 0 of each model), (layer 1 of each model), ..., repeated `repeats` times, so
T = models × layers × repeats. Genes 0..T-1 say whether each slot is in the path (in when > 0.5); genes
T..2T-1 are each slot's residual scale (merge_core/layer_path.py: a factor on its o_proj / down_proj outputs,
which mergekit's passthrough `scale` reproduces). Layer-major order makes one repeat hold every "which model
at this depth" path, and a second repeat lets a path run deeper or stack whole models.

Decoding keeps every genome valid instead of failing it: a path longer than max_layers keeps its max_layers
slots of highest include gene, one shorter than min_layers gains the excluded slots of highest gene.
Path models: the fine-tunes (and the base with include_base), after the stage-1 merge for ps+dfs.
"""

from pathlib import PurePath

import numpy as np

from merge_core.errors import InputError
from merge_core.layer_path import LayerPath, Slot
from merge_core.recipe import Recipe
from search.config import SearchConfig

STAGE1 = "stage1"  # the ps+dfs weight merge's name: a path's model reference, and mergekit-multi's stage name
INCLUDED = 0.5  # an include gene above this puts its slot in the path


class PathGenome:
    def __init__(self, config: SearchConfig, num_layers: int):
        self.config, self.num_layers = config, num_layers
        dfs = config.genome.dfs
        models = list(config.models.fine_tunes)
        if dfs.include_base:
            models.insert(0, config.models.base)
        self.models = [STAGE1, *models] if config.genome.kind == "ps+dfs" else models
        self.slots = [
            (model, layer) for _ in range(dfs.repeats) for layer in range(num_layers) for model in self.models
        ]
        self.max_layers = dfs.max_layers or 2 * num_layers
        self.min_layers = dfs.min_layers
        if self.min_layers > len(self.slots):
            raise InputError(
                config.where,
                "genome.dfs.min_layers",
                f"expected at most the {len(self.slots)} slots ({len(self.models)} models × {num_layers} layers × "
                f"{dfs.repeats} repeats), got {self.min_layers}",
            )
        count = len(self.slots)
        self.dim = 2 * count
        low, high = dfs.scale_bounds
        self.lower = np.concatenate([np.zeros(count), np.full(count, float(low))])
        self.upper = np.concatenate([np.ones(count), np.full(count, float(high))])
        names = [f"{self.label(model)}.L{layer}.r{index // (count // dfs.repeats)}" for index, (model, layer) in
                 enumerate(self.slots)]  # fmt: skip
        self.names = [f"in[{name}]" for name in names] + [f"scale[{name}]" for name in names]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper

    def describe(self) -> str:
        """For `evomerge plan`: what the genes are."""
        dfs = self.config.genome.dfs
        return (
            f"{self.dim} genes (layer paths over {len(self.models)} models × {self.num_layers} layers × "
            f"{dfs.repeats} repeats: include and residual scale per slot), {self.min_layers} to {self.max_layers} "
            f"layers, scale {dfs.scale_bounds[0]:g}..{dfs.scale_bounds[1]:g}"
        )

    def label(self, ref: str) -> str:
        return ref if ref == STAGE1 else PurePath(ref).name or ref

    def path(self, x: np.ndarray) -> LayerPath:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"expected a finite genome of shape ({self.dim},), got shape {x.shape}")
        count = len(self.slots)
        include, scales = x[:count], x[count:]
        chosen = np.flatnonzero(include > INCLUDED)
        # Highest gene first; a stable sort keeps the earlier slot on ties, so decoding is deterministic.
        ranked = np.argsort(-include, kind="stable")
        if len(chosen) > self.max_layers:
            chosen = np.sort(ranked[: self.max_layers])
        elif len(chosen) < self.min_layers:
            chosen = np.sort(ranked[: self.min_layers])
        return LayerPath(tuple(Slot(*self.slots[i], float(scales[i])) for i in chosen))

    def recipe_dict(self, x: np.ndarray) -> dict:
        template = self.config.merge.chat_template
        return self.path(x).recipe_dict(self.config.merge.dtype) | ({"chat_template": template} if template else {})

    def decode(self, x: np.ndarray) -> Recipe:
        return Recipe.from_dict(self.recipe_dict(x), where=f"{self.config.where} (decoded genome)")

    def encode(self, path: list[tuple[str, int]], scale: float = 1.0) -> np.ndarray:
        """The genome of `path` (model, layer) pairs, each taken from the earliest free slot after the last."""
        count = len(self.slots)
        x = np.concatenate([np.zeros(count), np.full(count, scale)])
        position = -1
        for model, layer in path:
            position = next(i for i in range(position + 1, count) if self.slots[i] == (model, layer))
            x[position] = 1.0
        return np.clip(x, self.lower, self.upper)

    def default_candidates(self) -> list[np.ndarray]:
        """The starting points a user would name: the stage-1 merge itself (ps+dfs), then each fine-tune, as
        whole-depth paths at scale 1 (within max_layers)."""
        depth = min(self.num_layers, self.max_layers)
        models = [m for m in self.models if m != self.config.models.base]
        scale = float(np.clip(1.0, *self.config.genome.dfs.scale_bounds))
        return [self.encode([(model, layer) for layer in range(depth)], scale) for model in models]


def path_line(recipe_yaml: str) -> str | None:
    """A layer-path recipe's path in one line ('cae 0-1, rev 1 ×0.8'); None for any other recipe."""
    path = LayerPath.of(Recipe.from_yaml(recipe_yaml))
    return path.describe(lambda ref: PurePath(ref).name or ref) if path else None
