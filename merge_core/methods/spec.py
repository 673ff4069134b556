"""What every merge method declares: its parameters once, its input contract, and one pure function."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

ParamValue = float | bool


@dataclass(frozen=True)
class Param:
    name: str
    per_model: bool  # True: read from each input model's parameters; False: one shared value per tensor
    default: ParamValue | None = None  # None means the recipe must give it
    inert: bool = False  # accepted, as mergekit accepts it, but the math ignores it: never worth searching

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass
class MergeInputs:
    """Everything a method needs to produce ONE output tensor.

    tensors: every input in merge order (mergekit's order: the recipe's models, base appended last when it is
        not listed), already cast to the merge dtype.
    base_index: position of the base in `tensors`, or None when the recipe has no base.
    per_model: parameter name -> one value per entry of `tensors` (defaults already filled in).
    shared: parameter name -> value (defaults already filled in).
    prepared: whatever the method's `prepare` returned for these inputs (cached by the session across
        candidates), or None when the caller did not prepare.
    generator: torch generator for random methods (None for deterministic ones).
    """

    tensors: list[torch.Tensor]
    base_index: int | None
    per_model: dict[str, list[ParamValue]]
    shared: dict[str, ParamValue]
    prepared: dict | None = None
    generator: torch.Generator | None = None
    name: str = ""

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    def others(self) -> list[int]:
        """Indices of the non-base inputs, in merge order."""
        return [i for i in range(len(self.tensors)) if i != self.base_index]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[MergeInputs], torch.Tensor]
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "ignored"] = "required"
    min_models: int = 1  # counted over all inputs, base included
    max_models: int | None = None
    non_base_models: int | None = None  # an exact count of non-base inputs, when the method needs one
    random: bool = False
    # Candidate-independent precomputation over the (cast) inputs, kept resident by a session so each
    # candidate does only its own arithmetic (task vectors, magnitude order). Returns what `merge`
    # later finds in MergeInputs.prepared.
    prepare: Callable[[list[torch.Tensor], int | None], dict] | None = None
    # Each output element depends only on the same element of the inputs (and the parameters), so the merge of
    # shards is the shard of the merge (merge_core/sharding.py). Not so for anything that ranks, normalizes or
    # draws over a whole tensor: TIES' top-k, slerp's angle, DARE's one RNG stream in tensor order.
    elementwise: bool = False
    aliases: tuple[str, ...] = field(default=())
    # Parameter names that published recipes give this method and mergekit 0.1.5 takes without reading (it skips
    # any name its method does not declare): accepted with a warning, unlike other unknown names (likely typos).
    ignored_params: tuple[str, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
