"""NSGA-II (Optuna): the Pareto search, for several objectives."""

from pathlib import Path

import optuna

from search.config import OptimizerConfig
from search.genome import Genome
from search.optimizers.base import Optimizer, SamplerOptimizer

DEFAULT_POPULATION = 50  # Optuna's default


def build(study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, state: Path) -> Optimizer:
    sampler = optuna.samplers.NSGAIISampler(population_size=options.popsize or DEFAULT_POPULATION, seed=seed)
    return SamplerOptimizer(study, genome, sampler)
