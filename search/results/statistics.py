"""Statistics for judging a search: paired bootstrap intervals, Pareto fronts and hypervolume.

Directions follow Optuna's words ("maximize" / "minimize"). Internally every objective is turned into one to
minimize by flipping the sign of the maximized columns, so the dominance and volume code has one case only.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

# Optuna's exact hypervolume (2-D sweep, WFG above) is what its own samplers and plots use; it has no public
# alias yet, so the import is pinned by pyproject's optuna range and by tests/test_statistics.py's hand values.
from optuna._hypervolume import compute_hypervolume

DIRECTIONS = ("maximize", "minimize")
# Bootstrap resamples are drawn in batches so that memory stays near this many indices whatever the item count.
_BOOTSTRAP_BLOCK_INDICES = 1 << 22


@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) over the n shared items and its bootstrap percentile interval [low, high] at `confidence`."""

    mean_diff: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDiff:
    """Percentile bootstrap interval of mean(a - b), where a[i] and b[i] score the same item i.

    Resampling the per-item differences is resampling item indices jointly for both models: the
    item-to-item variance that both models share cancels, which is what makes paired intervals tight.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"paired_bootstrap: expected two 1-D score vectors of equal length >= 1, got shapes {a.shape} and {b.shape}"
        )
    diff, n = a - b, a.size
    if not np.isfinite(diff).all():
        raise ValueError("paired_bootstrap: scores must be finite numbers (found NaN or inf)")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1, got {resamples}")

    # scipy resamples item indices jointly for a and b (paired=True), in batches that bound memory.
    result = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        batch=max(1, _BOOTSTRAP_BLOCK_INDICES // n),
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return PairedDiff(mean_diff=float(diff.mean()), low=float(low), high=float(high), n=n, confidence=confidence)


def _as_minimized(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """A float (n, d) copy with maximized columns negated, after checking shapes and direction names."""
    values = np.asarray(points, dtype=np.float64)
    if values.ndim == 1 and values.size == 0:
        values = values.reshape(0, len(directions))
    if values.ndim != 2 or values.shape[1] != len(directions):
        raise ValueError(
            f"expected points of shape (n, {len(directions)}) for {len(directions)} directions, got {values.shape}"
        )
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions: expected 'maximize' or 'minimize', got {unknown[0]!r}")
    signs = np.where(np.asarray(directions) == "maximize", -1.0, 1.0)
    return values * signs


def _non_dominated(minimized: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows that no other row dominates (all <= and at least one <)."""
    no_worse = (minimized[:, None, :] <= minimized[None, :, :]).all(axis=2)  # [j, i]: row j is nowhere worse than i
    better = (minimized[:, None, :] < minimized[None, :, :]).any(axis=2)
    return ~(no_worse & better).any(axis=0)


def pareto_front(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of `points`; equal rows are all kept."""
    return np.flatnonzero(_non_dominated(_as_minimized(points, directions)))


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]
) -> float:
    """Volume dominated by `points` and bounded by `reference` (exact, any number of objectives: Optuna's WFG).

    Points that do not strictly beat the reference in every objective add nothing.
    """
    minimized = _as_minimized(points, directions)
    ref = _as_minimized([reference], directions)[0]
    inside = minimized[(minimized < ref).all(axis=1)]
    return float(compute_hypervolume(inside, ref)) if len(inside) else 0.0
