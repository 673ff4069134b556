"""Optimizers behind one ask/tell interface, by the name search.yml gives them (optimizer.name)."""

from collections.abc import Callable
from dataclasses import dataclass

from merge_core.errors import InputError
from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import cma_es, gp, nsga2, random_search, tpe
from search.optimizers.base import Optimizer, Trial, open_study
from search.run_dir import RunDir


@dataclass(frozen=True)
class Kind:
    build: Callable[..., Optimizer]  # (study, genome, options, seed, state file) -> the optimizer
    why: str  # what it does, as `evomerge plan` says it
    pareto: bool = False  # takes several objectives (SearchConfig._check_objectives refuses the others)
    max_genes: int | None = None  # the largest genome it runs on (None: any)


OPTIMIZERS = {
    "cmaes": Kind(cma_es.build, "CMA-ES adapts a full covariance"),
    "nsga2": Kind(nsga2.build, "NSGA-II evolves a Pareto front of the objectives", pareto=True),
    "tpe": Kind(tpe.build, "TPE models each gene on its own, cheap at any size"),
    "gp": Kind(gp.build, "a GP models the genes jointly, sample-efficient on few trials", max_genes=gp.MAX_GENES),
    "random": Kind(random_search.build, "random search, the baseline the others must beat", pareto=True),
}


def make_optimizer(config: SearchConfig, genome: Genome, run_dir: RunDir, resume: bool) -> Optimizer:
    """The configured optimizer over `genome`, recording into the study in the run's Optuna storage.

    Seeding: a fresh run uses optimizer.seed. A resumed Optuna sampler is seeded with optimizer.seed plus the
    number of trials already in the study, so it does not replay the draws of the first session; a resumed
    CMA-ES restores its own RNG state from its checkpoint.
    """
    options, directions = config.optimizer, config.directions
    study = open_study(run_dir.storage, options.study_name, directions, genome, resume)
    seed = options.seed + len(study.get_trials(deepcopy=False))
    build = OPTIMIZERS[options.name].build
    return build(study, genome, options, seed, run_dir.optimizer_state(options.study_name))


def check_fits(config: SearchConfig, genome: Genome) -> None:
    """Refuse an optimizer the genome is too large for. The genome's size is known only once preflight has read
    the tensor names, so this runs right after, before a run directory or a Ray worker exists."""
    name, most = config.optimizer.name, OPTIMIZERS[config.optimizer.name].max_genes
    if most is not None and genome.dim > most:
        raise InputError(
            config.where,
            "optimizer.name",
            f"expected a genome of at most {most} genes for {name} (beyond that one ask takes over 2 s), "
            f"got {genome.dim} genes",
        )


def advice(config: SearchConfig, genome: Genome) -> str:
    """One line for `evomerge plan`: the optimizer, the genome size, what the optimizer does, and the size-bound
    optimizers this genome is small enough for (the specialists worth trying on it)."""
    name, dim, several = config.optimizer.name, genome.dim, len(config.objectives) > 1
    line = f"{name} ({dim} genes): {OPTIMIZERS[name].why}"
    if name == "cmaes" and cma_es.covariance(config.optimizer, dim) == "diagonal":
        line = f"{name} ({dim} genes): separable CMA-ES adapts a variance per gene"
        if config.optimizer.covariance == "auto":
            line += f" (covariance auto: diagonal above {cma_es.DIAGONAL_ABOVE} genes)"
    if OPTIMIZERS[name].max_genes is not None:
        return f"{line}; fits up to {OPTIMIZERS[name].max_genes} genes"
    fitting = [
        other
        for other, kind in OPTIMIZERS.items()
        if kind.max_genes is not None and dim <= kind.max_genes and (kind.pareto or not several)
    ]
    return line + "".join(f"; at {dim} genes {other} would also fit" for other in fitting)


__all__ = ["OPTIMIZERS", "Optimizer", "Trial", "advice", "check_fits", "make_optimizer"]
