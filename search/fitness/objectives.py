"""The objectives: which task scores a candidate is judged on, in which direction, and how they become the
values an optimizer is told. Rungs (rungs.py) and the score cache (score_cache.py) live beside this."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from search.config import SearchConfig


@dataclass(frozen=True)
class Objectives:
    keys: tuple[str, ...]  # the lm-eval task (or group) of each objective, in config order
    directions: tuple[str, ...]  # "maximize" or "minimize", one per key

    @classmethod
    def of(cls, config: SearchConfig) -> "Objectives":
        return cls(tuple(o.task for o in config.objectives), tuple(o.direction for o in config.objectives))

    def values(self, scores: Mapping[str, float]) -> list[float] | None:
        """The optimizer's values for one candidate's task scores; None when any is not finite (it failed)."""
        values = [float(scores[key]) for key in self.keys]
        return values if all(np.isfinite(values)) else None

    def signs(self) -> np.ndarray:
        """+1 for a maximized objective, -1 for a minimized one: sign * value is always 'higher is better'."""
        return np.array([1.0 if d == "maximize" else -1.0 for d in self.directions])

    def mean_fitness(self, values: Sequence[float]) -> float:
        """One number to rank candidates by when a single choice is needed: the mean of the signed values."""
        return float(np.mean(self.signs() * np.asarray(values, dtype=float)))

    def reference(self) -> np.ndarray:
        """The hypervolume reference: the worst each [0, 1] metric can score. Fixed, so hypervolumes stay
        comparable between steps and between runs."""
        return np.array([0.0 if d == "maximize" else 1.0 for d in self.directions])
