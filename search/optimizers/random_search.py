"""Random search (Optuna RandomSampler): the baseline every other optimizer must beat."""

from pathlib import Path

import optuna

from search.config import OptimizerConfig
from search.genome import Genome
from search.optimizers.base import Optimizer, SamplerOptimizer


def build(study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, state: Path) -> Optimizer:
    return SamplerOptimizer(study, genome, optuna.samplers.RandomSampler(seed=seed))
