"""The MoE genome: which experts of a mergekit-moe config a mixture keeps, and how loud each one is.

Two genes per expert of genome.moe's config, in its order: genes 0..E-1 say whether it is in (in when > 0.5),
genes E..2E-1 are its mergekit-moe `residual_scale` (its MLP output, down_proj, times this), rounded to 4
decimals so the candidate's YAML is exactly what it was scored as. Every candidate is a mergekit-moe config:
the kept experts in the config's order, with their prompts, so `evomerge moe` and mergekit-moe rebuild it. A
router-row scale would not be: mergekit normalises every row to unit length.

Decoding repairs rather than fails: fewer than max(experts_per_token, 2) experts in (mergekit refuses more
experts per token than experts, and one expert is the dense model with its base's attention, which it refuses
too) keeps that many of highest include gene.
"""

from pathlib import PurePath

import numpy as np
import yaml

from merge_core.moe_config import MoEConfig
from search.config import SearchConfig
from search.genome.data_flow import INCLUDED

DIGITS = 4  # of a residual scale


class MoEGenome:
    def __init__(self, config: SearchConfig):
        self.config = config
        self.moe = config.genome.moe.moe
        count = len(self.moe.experts)
        self.dim = 2 * count
        self.min_experts = min(count, max(self.moe.experts_per_token, 2))
        low, high = config.genome.moe.scale_bounds
        self.lower = np.concatenate([np.zeros(count), np.full(count, float(low))])
        self.upper = np.concatenate([np.ones(count), np.full(count, float(high))])
        labels = [f"e{i}.{label(expert.source_model)}" for i, expert in enumerate(self.moe.experts)]
        self.names = [f"in[{name}]" for name in labels] + [f"scale[{name}]" for name in labels]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper

    def describe(self) -> str:
        """For `evomerge plan`: what the genes are."""
        low, high = self.config.genome.moe.scale_bounds
        return (
            f"{self.dim} genes (an MoE over {len(self.moe.experts)} experts, gate_mode {self.moe.gate_mode}: include "
            f"and residual scale per expert), at least {self.min_experts} experts, scale {low:g}..{high:g}"
        )

    def experts(self, x: np.ndarray) -> list[tuple[int, float]]:
        """(expert index, residual scale) of the experts `x` keeps, in the config's order."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise ValueError(f"expected a finite genome of shape ({self.dim},), got shape {x.shape}")
        count = len(self.moe.experts)
        include, scales = x[:count], x[count:]
        chosen = np.flatnonzero(include > INCLUDED)
        if len(chosen) < self.min_experts:  # highest gene first; a stable sort keeps the earlier expert on ties
            chosen = np.sort(np.argsort(-include, kind="stable")[: self.min_experts])
        return [(int(i), round(float(scales[i]), DIGITS)) for i in chosen]

    def decode(self, x: np.ndarray) -> MoEConfig:
        data = self.moe.model_dump(mode="json", exclude_none=True)
        data["experts"] = [data["experts"][i] | {"residual_scale": scale} for i, scale in self.experts(x)]
        return MoEConfig.from_dict(data, where=f"{self.config.where} (decoded genome)")

    def default_candidates(self) -> list[np.ndarray]:
        """The config as given: every expert in, at its own residual scale (1 where it has none)."""
        scales = [1.0 if e.residual_scale is None else e.residual_scale for e in self.moe.experts]
        return [np.clip(np.concatenate([np.ones(len(scales)), scales]), self.lower, self.upper)]


def label(ref: str) -> str:
    return PurePath(ref).name or ref


def experts_line(moe_yaml: str) -> str:
    """An MoE candidate's experts and scales in one line ('rev ×1.2, cae ×0.85')."""
    experts = yaml.safe_load(moe_yaml)["experts"]
    return ", ".join(f"{label(e['source_model'])} ×{e.get('residual_scale', 1.0):g}" for e in experts)
