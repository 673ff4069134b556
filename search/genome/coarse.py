"""Stage 1 of coarse-to-fine: the one-knob merges a user would tune by hand, as genomes.

Each searched parameter takes the values of its grid below (clipped into the genome's bounds), the same for
every layer, module and fine-tune; the stage is every combination. Parameters without a grid keep the
method's default (the bounds' midpoint where it has none). A weight the method normalizes away (TIES, linear
with `normalize`: a weight shared by all fine-tunes cancels) is not gridded, since every value is one model: it
sits at the middle of its bounds, where CMA-ES started from the best has room both ways (at a bound, half of
its samples would be folded back).

The search evaluates these first (`optimizer.coarse_to_fine`), charged to its budget like any trial; CMA-ES
then starts its per-layer, per-module search from the best of them, the other optimizers learn from them as
from any trial in the study.
"""

import itertools

import numpy as np

from search.genome.parameter_space import Genome

DENSITY_GRID = (0.3, 0.5, 0.7, 0.9)
KNOB_GRIDS = {
    # A shared weight is task arithmetic's λ: the small task vectors of a family of fine-tunes often want
    # far less than 1, so the grid is finer there.
    "weight": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    "density": DENSITY_GRID,
    "t": (0.1, 0.3, 0.5, 0.7, 0.9),
    "lambda": (0.25, 0.5, 0.75, 1.0),
}


def knob_values(genome: Genome) -> dict[str, list[float]]:
    """The stage's values per searched parameter, in config order, each inside the genome's bounds."""
    config, method = genome.config, genome.method
    normalize = method.param("normalize")
    normalizes = normalize is not None and bool(config.merge.parameters.get("normalize", normalize.default))
    values = {}
    for name in config.genome.params:
        low, high = config.bounds(name)
        if name == "weight" and normalizes:
            grid = ((low + high) / 2,)
        else:
            default = method.param(name).default
            grid = KNOB_GRIDS.get(name, ((low + high) / 2 if default is None else default,))
        values[name] = sorted({float(np.clip(value, low, high)) for value in grid})
    return values


def coarse_grid(genome: Genome) -> list[np.ndarray]:
    """Every combination of `knob_values`, as uniform genomes (the first parameter varies slowest)."""
    values = knob_values(genome)
    return [
        genome.encode_uniform(dict(zip(values, point, strict=True))) for point in itertools.product(*values.values())
    ]
