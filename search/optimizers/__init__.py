"""Optimizers behind one ask/tell interface, by the name search.yml gives them (optimizer.name)."""

from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import cma_es, nsga2, random_search, tpe
from search.optimizers.base import Optimizer, Trial, open_study
from search.run_dir import RunDir

OPTIMIZERS = {"cmaes": cma_es.build, "nsga2": nsga2.build, "tpe": tpe.build, "random": random_search.build}


def make_optimizer(config: SearchConfig, genome: Genome, run_dir: RunDir, resume: bool) -> Optimizer:
    """The configured optimizer over `genome`, recording into the study in the run's Optuna storage.

    Seeding: a fresh run uses optimizer.seed. A resumed Optuna sampler is seeded with optimizer.seed plus the
    number of trials already in the study, so it does not replay the draws of the first session; a resumed
    CMA-ES restores its own RNG state from its checkpoint.
    """
    options, directions = config.optimizer, config.directions
    study = open_study(run_dir.storage, options.study_name, directions, genome, resume)
    seed = options.seed + len(study.get_trials(deepcopy=False))
    return OPTIMIZERS[options.name](study, genome, options, seed, run_dir.optimizer_state(options.study_name))


__all__ = ["OPTIMIZERS", "Optimizer", "Trial", "make_optimizer"]
