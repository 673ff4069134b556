"""Gaussian-process Bayesian optimization (Optuna's GPSampler): sample-efficient on small genomes, one objective.

Each ask refits the GP on every finished trial and optimizes its acquisition over every gene: its cost grows with
the trials (the fit is cubic in them) and, past several hundred genes, with the genome. MAX_GENES is where one ask
reaches ~2 s at 50 finished trials (experiments/bench_gp_ask.py; the numbers in experiments/RESULTS.md).
"""

from pathlib import Path

import optuna

from search.config import OptimizerConfig
from search.genome import Genome
from search.optimizers.base import Optimizer, SamplerOptimizer

MAX_GENES = 1000  # measured: 1.3 s per ask at 800 genes, 2.0 s at 1200, 2.2 s at 1600


def build(study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, state: Path) -> Optimizer:
    return SamplerOptimizer(study, genome, optuna.samplers.GPSampler(seed=seed))
