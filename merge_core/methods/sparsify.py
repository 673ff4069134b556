"""Sparsifiers for task vectors: which entries of one model's delta survive, and the optional L1 rescale.

Each sparsifier splits its work into `rank` (depends only on the delta, so a session computes it once per
source and keeps it) and `sparsify` (the per-candidate part: density, gamma/epsilon, the random draw).
`sparsify(..., ranks=None)` computes the ranks itself, so prepared and unprepared merges share one code path.

Magnitude ranks are positions in the same sort mergekit runs, not a re-derived order: with ties (common in
bf16) only the identical sort call keeps the identical entries at the density boundary.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from merge_core.errors import InputError
from merge_core.methods.spec import Param

Ranks = Callable[[torch.Tensor], torch.Tensor]
# (delta, density, extra (gamma/epsilon), rescale, ranks or None, generator) -> sparsified delta
Sparsify = Callable[[torch.Tensor, float, float, bool, torch.Tensor | None, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class Sparsifier:
    sparsify: Sparsify
    rank: Ranks | None = None  # candidate-independent precomputation; None when there is nothing to keep
    extra: Param | None = None  # the one per-model knob beyond density (gamma, epsilon)
    random: bool = False


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """delta * mask, scaled back to delta's L1 norm (one ratio per tensor, not 1/density)."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _random_work_dtype(delta: torch.Tensor) -> torch.dtype:
    # CPU bernoulli has no float16 kernel, so mergekit draws in float32 there (and for float64 too).
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        return delta.dtype
    return torch.float32


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    index_dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    ranks = torch.empty(order.shape, dtype=index_dtype, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=index_dtype, device=order.device)
    return ranks


def _flat_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    magnitudes = delta.abs().reshape(-1)
    return magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes


def descending_magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    return _inverse_permutation(torch.argsort(_flat_magnitudes(delta), descending=True))


def ascending_magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    return _inverse_permutation(torch.sort(_flat_magnitudes(delta), descending=False).indices)


def keep_largest(
    delta: torch.Tensor,
    density: float,
    _extra: float,
    rescale: bool,
    ranks: torch.Tensor | None,
    _generator: torch.Generator | None,
) -> torch.Tensor:
    """TIES trimming: keep the max(1, int(density*n)) largest |delta|."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    ranks = descending_magnitude_ranks(delta) if ranks is None else ranks
    keep = max(1, int(density * delta.numel()))
    mask = (ranks < keep).to(delta.dtype).reshape_as(delta)
    return l1_rescaled(delta, mask, rescale)


def keep_middle(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    rescale: bool,
    ranks: torch.Tensor | None,
    _generator: torch.Generator | None,
) -> torch.Tensor:
    """Breadcrumbs: drop the gamma share of largest |delta| (outliers), then the smallest down to density."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    # Fewer outliers are dropped when dropping all of them would fall below the target density.
    bottom = max(0, n - keep - top)
    ranks = ascending_magnitude_ranks(delta) if ranks is None else ranks
    mask = ((ranks >= bottom) & (ranks < bottom + keep)).to(delta.dtype).reshape_as(delta)
    return l1_rescaled(delta, mask, rescale)


def drop_random(
    delta: torch.Tensor,
    density: float,
    _extra: float,
    rescale: bool,
    _ranks: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DARE: keep each entry with probability density; one full-tensor draw per model, as mergekit draws."""
    if density >= 1:
        return delta
    work_dtype = _random_work_dtype(delta)
    keep_probability = torch.full_like(delta, density, dtype=work_dtype)
    mask = torch.bernoulli(keep_probability, generator=generator)
    return l1_rescaled(delta.to(work_dtype), mask, rescale).to(delta.dtype)


def della_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's |delta| rank within its row (dim 1; a 1-D tensor is one row), scaled to [0, 1]."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(_random_work_dtype(delta)) + 1
    # Computed from the cast ranks, not as (rank-1)/(n-1): in bf16 large ranks round, and mergekit's
    # min/max see the rounded values.
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    return ((ranks - lowest) / (highest - lowest)).clamp(0, 1)


def drop_by_magnitude_rank(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    rank_norm: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the row rank, from density-eps to density+eps."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise InputError(
            "della",
            "epsilon",
            f"density ± epsilon must lie strictly inside (0, 1); got density={density}, epsilon={epsilon}",
        )
    work_dtype = _random_work_dtype(delta)
    rank_norm = della_rank_norm(delta) if rank_norm is None else rank_norm
    keep_probability = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(keep_probability, generator=generator).to(work_dtype)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    return l1_rescaled(rows.to(work_dtype), mask, rescale).to(delta.dtype).reshape(delta.shape)


MAGNITUDE = Sparsifier(keep_largest, rank=descending_magnitude_ranks)
RANDOM = Sparsifier(drop_random, random=True)
MAGNITUDE_OUTLIERS = Sparsifier(keep_middle, rank=ascending_magnitude_ranks, extra=Param("gamma", True, 0.01))
DELLA_MAGPRUNE = Sparsifier(
    drop_by_magnitude_rank,
    rank=della_rank_norm,
    extra=Param("epsilon", True, 0.15),
    random=True,
)
