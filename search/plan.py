"""`evomerge plan`: validate a search, time one candidate for real, and project the run's wall time and cost.

The timing runs the same worker code as the search (in this process, no Ray): sources loaded, a default
candidate merged into the live model and scored, twice — the second call is the steady state a search pays.
"""

import math
import time
from pathlib import Path

from search.config import BudgetConfig, SearchConfig
from search.execution.preflight import preflight, worker_spec
from search.execution.worker import HELDOUT, SEARCH, CandidateWorker, Job
from search.fitness.rungs import Rungs
from search.genome import Genome, MoEGenome, PathGenome, make_genome
from search.genome.coarse import coarse_grid, knob_values
from search.optimizers import advice, check_fits
from search.results import baselines


def plan_search(config_path: Path) -> str:
    config = SearchConfig.from_yaml(config_path)
    started = time.perf_counter()
    checked = preflight(config)
    genome = make_genome(config, checked.tensor_names, checked.num_layers)
    check_fits(config, genome)  # before timing a candidate: a search that cannot run needs no projection
    defaults = genome.default_candidates()
    x = defaults[0] if defaults else (genome.lower + genome.upper) / 2
    job = Job(genome.decode(x).to_yaml(), seed=config.seed)
    load_start = time.perf_counter()
    worker = CandidateWorker(worker_spec(config, checked.memory))
    load_s = time.perf_counter() - load_start
    worker.run(job)  # the first call also prepares task vectors and builds lm-eval's requests
    worker.live = None  # so the steady call merges again: its merge time is what every new candidate pays
    steady = worker.run(job)
    # Every rung's part, once: a candidate pays the first, and each further one only when promoted to it.
    parts = [steady] + [
        worker.run(Job(job.recipe_yaml, job.seed, part=k)) for k in range(1, len(config.search_parts()))
    ]
    rungs = Rungs(tuple(config.fitness.rungs or [config.fitness.limit or 0]), config.fitness.promote)
    share = [config.fitness.promote**k for k in range(len(parts))]  # of candidates that reach each rung
    items_each = sum(part.items * reached for part, reached in zip(parts, share, strict=True))
    per_trial = sum((part.merge_s + part.eval_s) * reached for part, reached in zip(parts, share, strict=True))
    heldout_s = worker.run(Job(job.recipe_yaml, job.seed, HELDOUT)).eval_s if config.held_out.tasks else 0.0

    workers, budget = config.execution.workers, config.budget
    limit, candidates = binding_limit(budget, per_trial / workers, items_each)
    full_items, full_s = sum(p.items for p in parts), sum(p.eval_s for p in parts) + steady.merge_s
    search_s = candidates * per_trial / workers
    # After the search: the tuning grids and the parents on the search split, then the parents, the default and
    # tuned baselines and (say) 3 front members held out.
    base, children = config.models.base, list(config.models.fine_tunes)
    tuned = config.baselines.tuned
    grids = sum(len(baselines.TUNED[name].candidates(base, children)) for name in tuned)
    parents, references = 1 + len(children), len(baselines.default_baselines(base, children)) + len(tuned)
    final_s = (grids + parents) * full_s / workers
    final_s += (parents + references + 3) * (steady.merge_s + heldout_s) / workers
    lines = [
        f"config        {config.where}: valid; {len(config.models.fine_tunes)} fine-tunes of {config.models.base}",
        f"genome        {genome.describe()}",
        f"optimizer     {advice(config, genome)}",
        f"start         {start_line(config, genome)}",
        f"objectives    {', '.join(f'{o.task} ({o.metric}, {o.direction})' for o in config.objectives)}",
        f"held out      {', '.join(t.task for t in config.held_out.tasks) or 'none'}",
        *checked.memory.lines(),
        f"one candidate merge {steady.merge_s:.3f}s + {SEARCH} eval {steady.eval_s:.3f}s; worker start {load_s:.1f}s",
        f"budget        {budget.trials or '∞'} trials, wall time {budget.wall_time or '∞'} s, "
        f"{budget.item_evals or '∞'} items, {workers} worker(s)",
        f"fidelity      {fidelity_line(rungs, config.fitness.promote)}",
        f"cost          ~{items_each:.0f} items per candidate (all {full_items} at full fidelity) × ~{candidates:.0f} "
        f"candidates = ~{candidates * items_each:.0f} items; budget.{limit} binds",
        f"projected     search ~{search_s:.0f}s + final comparison ~{final_s:.0f}s "
        f"(+ Ray and worker start ~{load_s + 10:.0f}s); planning took {time.perf_counter() - started:.0f}s",
    ]
    return "\n".join(lines)


STARTS = {"ps": "default recipe(s) of the method", "moe": "mergekit-moe config(s) as given"}


def start_line(config: SearchConfig, genome: Genome | PathGenome | MoEGenome) -> str:
    """What is asked before the optimizer's own proposals."""
    defaults = len(genome.default_candidates()) if config.optimizer.warm_start else 0
    starts = STARTS.get(config.genome.kind, "path model(s)' own full-depth paths")
    said = f"the {defaults} {starts} first" if defaults else "the optimizer's own proposals"
    if not config.optimizer.coarse_to_fine:
        return said
    then = "CMA-ES then starts from the best" if config.optimizer.name == "cmaes" else "the optimizer learns from them"
    if config.genome.kind != "ps":  # no knobs to grid: the warm starts are the coarse stage
        return f"coarse to fine: {said}; {then}" if defaults else said
    knobs = ", ".join(f"{name} {'/'.join(f'{v:g}' for v in values)}" for name, values in knob_values(genome).items())
    return f"coarse to fine: {len(coarse_grid(genome))} one-knob genomes ({knobs}) and {said}; {then}"


def fidelity_line(rungs: Rungs, promote: float) -> str:
    if rungs.top == 0:
        return f"one rung: every candidate is scored on all {rungs.sizes[0] or 'the'} items per task"
    schedule = " → ".join(map(str, rungs.sizes))
    return (
        f"rungs of {schedule} items per task, the best {promote:.0%} at each go on (asynchronous successive "
        f"halving): ~{rungs.expected_items():.0f} items per task per candidate, against {rungs.sizes[-1]} without"
    )


def binding_limit(budget: BudgetConfig, seconds_each: float, items_each: float) -> tuple[str, float]:
    """The budget limit that stops the search first, and how many candidates run by then. `seconds_each`: wall
    time per candidate with every worker busy. Item budgets round up: the candidate that crosses one finishes."""
    candidates = {
        "trials": budget.trials,
        "wall_time": None if budget.wall_time is None else budget.wall_time / seconds_each,
        "item_evals": None if budget.item_evals is None else math.ceil(budget.item_evals / items_each),
    }
    return min(((name, n) for name, n in candidates.items() if n is not None), key=lambda limit: limit[1])
