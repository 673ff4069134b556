"""Multi-fidelity fitness: asynchronous successive halving (ASHA) over nested item subsets.

Rung k scores a candidate on the first fitness.rungs[k] items of every objective task (parts 0..k of
SearchConfig.search_parts). When a candidate finishes a rung, it goes on to the next at once if it ranks in
the best `promote` share of every candidate ever scored at that rung (itself included, at least the best
one; a tie ranks below the candidate that scored it first); otherwise it stops there for good. No barrier: nobody waits for a rung to fill, and early candidates
compete against fewer others, as in ASHA. Only scores of the same rung are ever ranked against each other.

What the optimizers are told: a candidate that reached the last rung is COMPLETE with its full-fidelity
values; one that stopped earlier is PRUNED, with (one objective) its value reported at the step of its rung's
item count, so Optuna's TPE ranks it below every trial that went further, GP and NSGA-II leave it out, and
CMA-ES ranks a generation by (rung reached, value).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

RUNG_FITNESS = "rung_fitness"  # trial user attr: the candidate's mean fitness at each rung it finished


@dataclass(frozen=True)
class Rungs:
    sizes: tuple[int, ...]  # items per task at each rung; one rung: no multi-fidelity
    promote: float  # the share of a rung's candidates that go on

    @property
    def top(self) -> int:
        return len(self.sizes) - 1

    def goes_on(self, rung: int, fitness: float, others: Sequence[float]) -> bool:
        """Whether a candidate of `fitness` (higher is better) at `rung` goes on to the next rung, against the
        fitness of every other candidate scored at that rung so far."""
        if rung >= self.top:
            return False
        kept = max(1, math.floor((len(others) + 1) * self.promote + 1e-9))
        # Ties count against it: on a flat stretch (many candidates scoring alike, say all 0) the first one
        # already stands for that score, and promoting every tie would pay full price for nothing new.
        return sum(other >= fitness for other in others) < kept

    def expected_items(self) -> float:
        """Items per task a candidate costs on average when each rung keeps its share: for `evomerge plan`."""
        added = [b - a for a, b in zip((0, *self.sizes[:-1]), self.sizes, strict=True)]
        return sum(size * self.promote**k for k, size in enumerate(added))
