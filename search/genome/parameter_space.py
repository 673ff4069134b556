"""The genome: a flat vector of numbers that decodes to one mergekit recipe.

Layout. For each searched parameter p (config order), for each owner (every fine-tune when p is per-model,
e.g. weight / density; one shared owner when p is shared, e.g. slerp's t), the genes are:
    pre    one gene for the pre-layer tensors (input embeddings), when the model has any
    post   one gene for the post-layer tensors (final norm, lm_head), when the model has any
    then, for each module filter (config `genome.filters`, default self_attn and mlp, then the implicit
    "rest" holding the layer tensors no filter matches, when there are any):
        ceil(L / layer_granularity) genes, one per group of consecutive layers, or
        K genes with `smooth: K`: knots at layers 0, (L-1)/(K-1), ..., L-1, linearly interpolated per layer,
        so the dimension does not grow with depth.
A layer tensor belongs to the first filter that is a substring of its name (mergekit's rule), else to rest.

Decoding (exact). The recipe uses mergekit's `models:` syntax: one slice over all L layers, where layer i
reads a gradient list of N values at t = i / (L - 1) (t = 1 for a one-layer model), position t * (N - 1).
Each (parameter, owner) becomes one filter list:
    - one entry per pre/post tensor, its filter the tensor's full name as merge_core.architecture lists it
      (a full name, not e.g. "norm", which would also match every input_layernorm), its value a scalar;
      these come first, so the layer filters below never see them;
    - one entry per module filter, then a catch-all entry (no filter) for rest, each a gradient with one
      anchor per layer holding that layer's value.
The anchors sit every `stride` positions (N = stride * (L - 1) + 1) with the smallest stride for which
i / (L - 1) * (N - 1) is exactly the integer i * stride in float64 for every layer i: for most depths
stride is 1, but e.g. 15 / 22 * 22 == 14.999999999999998, so L = 23 needs stride 3. The gradient then
reads each layer's anchor with fraction 0, which returns the anchor bit for bit. Positions between anchors
repeat the anchor before them (never read). Fixed parameters (config merge.parameters) are plain scalars.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from merge_core import architecture
from merge_core.errors import InputError
from merge_core.recipe import Recipe
from search.config import SearchConfig

MAX_STRIDE = 1000  # never reached for depths up to 1024; a guard against looping forever


@dataclass(frozen=True)
class Block:
    """A run of genes sharing (param, owner, part): part is "pre", "post", or a module filter (None = rest)."""

    param: str
    owner: str | None  # the fine-tune's reference, or None for a shared parameter
    part: str | None
    start: int
    size: int


class Genome:
    """The genes of one search (layout and decoding in the module docstring).

    dim, names (one readable name per gene, e.g. "weight[srt].mlp.L3"), lower / upper (bounds per gene);
    decode(x) -> Recipe, recipe_dict(x), layer_values(x), encode_uniform(values),
    default_candidates().
    """

    def __init__(self, config: SearchConfig, tensor_names: Sequence[str], num_layers: int):
        self.config = config
        self.method = config.merge.spec
        self.num_layers = num_layers
        layout = architecture.layout(tensor_names)
        if layout.num_layers != num_layers:
            raise ValueError(f"tensor names hold {layout.num_layers} layers, but num_layers is {num_layers}")
        self.pre, self.post = list(layout.pre), list(layout.post)
        _check_whole_names(self.pre + self.post, tensor_names)
        layer_tensors = [name for name in tensor_names if architecture.layer_index(name) is not None]
        self.parts = self._module_parts(layer_tensors)
        self.stride = anchor_stride(num_layers)
        self.owners = {
            param: list(config.models.fine_tunes) if self.method.param(param).per_model else [None]
            for param in config.genome.params
        }
        self.blocks = self._blocks()
        self.dim = sum(block.size for block in self.blocks)
        self.lower = np.concatenate([np.full(b.size, config.bounds(b.param)[0]) for b in self.blocks])
        self.upper = np.concatenate([np.full(b.size, config.bounds(b.param)[1]) for b in self.blocks])
        self.names = [name for block in self.blocks for name in self._gene_names(block)]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper

    def describe(self) -> str:
        """For `evomerge plan`: what the genes are."""
        params = ", ".join(self.config.genome.params)
        bounds = f"{np.round(self.lower.min(), 3)}..{np.round(self.upper.max(), 3)}"
        return f"{self.dim} genes ({self.method.name}: {params}), {self.num_layers} layers, bounds {bounds}"

    def _module_parts(self, layer_tensors: list[str]) -> list[str | None]:
        filters = self.config.genome.filters
        for index, name in enumerate(filters):
            if not any(name in tensor for tensor in layer_tensors):
                example = layer_tensors[0] if layer_tensors else "none"
                raise InputError(
                    self.config.where,
                    f"genome.filters[{index}]",
                    f"expected a substring of some layer tensor name (e.g. {example!r}), got {name!r}",
                )
        has_rest = any(not any(f in tensor for f in filters) for tensor in layer_tensors)
        return [*filters, None] if has_rest else list(filters)

    def _blocks(self) -> list[Block]:
        genome = self.config.genome
        per_part = genome.smooth or math.ceil(self.num_layers / genome.layer_granularity)
        blocks, start = [], 0
        for param, owners in self.owners.items():
            for owner in owners:
                # pre/post first: their filter entries must precede the module filters in the recipe
                sizes = [("pre", 1)] * bool(self.pre) + [("post", 1)] * bool(self.post)
                sizes += [(part, per_part) for part in self.parts]
                for part, size in sizes:
                    blocks.append(Block(param, owner, part, start, size))
                    start += size
        return blocks

    def _gene_names(self, block: Block) -> list[str]:
        owner = "" if block.owner is None else f"[{self._label(block.owner)}]"
        stem = f"{block.param}{owner}.{'rest' if block.part is None else block.part}"
        if block.part in ("pre", "post"):
            return [stem]
        if self.config.genome.smooth:
            return [f"{stem}.knot{k}" for k in range(block.size)]
        step = self.config.genome.layer_granularity
        groups = [(g * step, min((g + 1) * step, self.num_layers) - 1) for g in range(block.size)]
        return [f"{stem}.L{a}" if a == b else f"{stem}.L{a}-{b}" for a, b in groups]

    def _label(self, ref: str) -> str:
        """A short readable name for a fine-tune: its last path component, unless two share it."""
        refs = self.config.models.fine_tunes
        short = [PurePath(r).name or r for r in refs]
        index = refs.index(ref)
        return short[index] if short.count(short[index]) == 1 else f"{index}:{short[index]}"

    # --- decoding -----------------------------------------------------------------------------------

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"expected a finite genome of shape ({self.dim},), got shape {x.shape}")
        return x

    def _per_layer(self, genes: np.ndarray) -> np.ndarray:
        if self.config.genome.smooth:
            knots = np.linspace(0, self.num_layers - 1, len(genes))
            return np.interp(np.arange(self.num_layers), knots, genes)
        return genes[np.arange(self.num_layers) // self.config.genome.layer_granularity]

    def layer_values(self, x: np.ndarray) -> dict[tuple[str | None, str, str | None], np.ndarray]:
        """(owner, param, module filter or None for rest) -> the value at each layer, shape (L,)."""
        x = self._check(x)
        return {
            (b.owner, b.param, b.part): self._per_layer(x[b.start : b.start + b.size])
            for b in self.blocks
            if b.part not in ("pre", "post")
        }

    def _filter_list(self, x: np.ndarray, param: str, owner: str | None) -> list[dict]:
        entries = []
        for block in (b for b in self.blocks if (b.param, b.owner) == (param, owner)):
            genes = x[block.start : block.start + block.size]
            if block.part in ("pre", "post"):
                names = self.pre if block.part == "pre" else self.post
                entries += [{"filter": name, "value": float(genes[0])} for name in names]
                continue
            anchors = [float(v) for v in self._per_layer(genes) for _ in range(self.stride)]
            gradient = anchors[: self.stride * (self.num_layers - 1) + 1]
            entries.append({"value": gradient} if block.part is None else {"filter": block.part, "value": gradient})
        return entries

    def recipe_dict(self, x: np.ndarray) -> dict:
        """The mergekit recipe (plain YAML data) that `x` stands for."""
        x = self._check(x)
        config, method = self.config, self.method
        fixed = config.merge.parameters
        shared = {name: value for name, value in fixed.items() if not method.param(name).per_model}
        models = []
        for ref in config.models.fine_tunes:
            parameters = {name: value for name, value in fixed.items() if method.param(name).per_model}
            for param, owners in self.owners.items():
                if ref in owners:
                    parameters[param] = self._filter_list(x, param, ref)
            models.append({"model": ref, "parameters": parameters} if parameters else {"model": ref})
        for param, owners in self.owners.items():
            if owners == [None]:
                shared[param] = self._filter_list(x, param, None)
        recipe = {"merge_method": method.name}
        if method.base != "ignored":
            recipe["base_model"] = config.models.base
        recipe["models"] = models
        if shared:
            recipe["parameters"] = shared
        if config.merge.dtype:
            recipe["dtype"] = config.merge.dtype
        if config.merge.chat_template:
            recipe["chat_template"] = config.merge.chat_template
        return recipe | config.merge.tokenizer_keys()

    def decode(self, x: np.ndarray) -> Recipe:
        return Recipe.from_dict(self.recipe_dict(x), where=f"{self.config.where} (decoded genome)")

    # --- encoding (warm start) ----------------------------------------------------------------------

    def _fill(self, values: Mapping[str, float | Sequence[float]]) -> np.ndarray:
        x = np.empty(self.dim)
        for block in self.blocks:
            value = values.get(block.param, self.method.param(block.param).default)
            if value is None:
                raise ValueError(f"no value for {block.param!r}: the method has no default for it")
            if not isinstance(value, int | float):
                if block.owner is None:
                    raise ValueError(f"{block.param!r} is shared by all models: expected one number, got {value}")
                value = value[self.config.models.fine_tunes.index(block.owner)]
            x[block.start : block.start + block.size] = value
        return x

    def encode_uniform(self, values: Mapping[str, float | Sequence[float]]) -> np.ndarray:
        """The genome giving every layer and tensor the same value per (param, fine-tune).

        `values[param]` is one number for all fine-tunes or one per fine-tune (config order); a searched
        parameter left out takes the method's default. Raises ValueError outside the genome's bounds.
        """
        x = self._fill(values)
        outside = (x < self.lower) | (x > self.upper)
        if outside.any():
            index = int(np.argmax(outside))
            low, high = self.lower[index], self.upper[index]
            raise ValueError(f"{self.names[index]} = {x[index]} is outside the bounds [{low}, {high}]")
        return x

    def default_candidates(self) -> list[np.ndarray]:
        """Textbook recipes of the method, clipped into the bounds, duplicates dropped: weight 1 with
        density 0.5 (TIES' usual default; plain task arithmetic at lambda 1 when the method has no density
        to search) and the uniform average, weight 1/n with density 1; t = 0.5; other searched parameters
        at the method's default."""
        n = len(self.config.models.fine_tunes)
        textbook = {"weight": 1.0, "density": 0.5, "t": 0.5}
        uniform = {"weight": 1.0 / n, "density": 1.0, "t": 0.5}
        candidates = []
        for values in (textbook, uniform):
            x = np.clip(self._fill(values), self.lower, self.upper)
            if not any(np.array_equal(x, seen) for seen in candidates):
                candidates.append(x)
        return candidates


def anchor_stride(num_layers: int) -> int:
    """Smallest stride s such that mergekit's gradient position for layer i, i / (L-1) * (s * (L-1)),
    is exactly the integer s * i for every layer (so the gradient returns that layer's anchor exactly)."""
    if num_layers <= 1:
        return 1  # a one-layer slice reads t = 1 of a one-anchor gradient: position 0
    span = num_layers - 1
    for stride in range(1, MAX_STRIDE + 1):
        if all((i / span) * (stride * span) == stride * i for i in range(num_layers)):
            return stride
    raise ValueError(f"no exact gradient anchoring found for {num_layers} layers")


def _check_whole_names(names: list[str], tensor_names: Sequence[str]) -> None:
    """A pre/post tensor's full name is its filter: it must not also be a substring of another tensor's name."""
    for name in names:
        clash = next((other for other in tensor_names if other != name and name in other), None)
        if clash:
            raise ValueError(f"tensor name {name!r} is part of {clash!r}: it cannot be a filter of its own")
