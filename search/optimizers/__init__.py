"""Optimizers behind one ask/tell interface, by the name search.yml gives them (optimizer.name)."""

from collections.abc import Sequence
from pathlib import Path

from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import cma_es, nsga2, random_search, tpe
from search.optimizers.base import Optimizer, Trial, open_study

OPTIMIZERS = {"cmaes": cma_es.build, "nsga2": nsga2.build, "tpe": tpe.build, "random": random_search.build}
SINGLE_OBJECTIVE = {"cmaes", "tpe"}


def make_optimizer(
    config: SearchConfig, genome: Genome, storage_path: Path, directions: Sequence[str], resume: bool
) -> Optimizer:
    """The configured optimizer over `genome`, recording into the study in the sqlite file `storage_path`.

    Seeding: a fresh run uses optimizer.seed. A resumed Optuna sampler is seeded with optimizer.seed plus the
    number of trials already in the study, so it does not replay the draws of the first session; a resumed
    CMA-ES restores its own RNG state from its checkpoint.
    """
    options = config.optimizer
    if options.name in SINGLE_OBJECTIVE and len(directions) != 1:
        raise ValueError(f"optimizer {options.name} takes one objective, got {len(directions)}: use nsga2 or random")
    study = open_study(storage_path, options.study_name, directions, genome, resume)
    seed = options.seed + len(study.get_trials(deepcopy=False))
    return OPTIMIZERS[options.name](study, genome, options, seed, Path(storage_path).parent)


__all__ = ["OPTIMIZERS", "Optimizer", "Trial", "make_optimizer"]
