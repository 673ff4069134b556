"""`evomerge plan`: validate a search, time one candidate for real, and project the run's wall time.

The timing runs the same worker code as the search (in this process, no Ray): sources loaded, a default
candidate merged into the live model and scored, twice — the second call is the steady state a search pays.
"""

import time
from pathlib import Path

import numpy as np

from search.config import SearchConfig
from search.execution.preflight import preflight, worker_spec
from search.execution.worker import HELDOUT, SEARCH, CandidateWorker, Job
from search.genome import Genome
from search.results import baselines


def plan_search(config_path: Path) -> str:
    config = SearchConfig.from_yaml(config_path)
    started = time.perf_counter()
    checked = preflight(config)
    genome = Genome(config, checked.tensor_names, checked.num_layers)
    defaults = genome.default_candidates()
    x = defaults[0] if defaults else (genome.lower + genome.upper) / 2
    job = Job(genome.decode(x).to_yaml(), seed=config.seed)
    load_start = time.perf_counter()
    worker = CandidateWorker(worker_spec(config))
    load_s = time.perf_counter() - load_start
    worker.run(job)  # the first call also prepares task vectors and builds lm-eval's requests
    steady = worker.run(job)
    per_trial = steady.merge_s + steady.eval_s
    heldout_s = worker.run(Job(job.recipe_yaml, job.seed, HELDOUT)).eval_s if config.held_out.tasks else 0.0

    workers, budget = config.execution.workers, config.budget
    search_s = budget.trials * per_trial / workers if budget.trials else float("inf")
    if budget.wall_time is not None:
        search_s = min(search_s, budget.wall_time)
    # After the search: the λ grid on the search split, then parents, default baselines and the front held out.
    final_s = len(baselines.LAMBDA_GRID) * per_trial / workers
    final_s += (2 + len(config.models.fine_tunes) + 3 + 3) * (steady.merge_s + heldout_s) / workers
    lines = [
        f"config        {config.where}: valid; {len(config.models.fine_tunes)} fine-tunes of {config.models.base}",
        f"genome        {genome.dim} genes ({config.merge.method}: {', '.join(config.genome.params)}), "
        f"{checked.num_layers} layers, bounds {np.round(genome.lower.min(), 3)}..{np.round(genome.upper.max(), 3)}",
        f"objectives    {', '.join(f'{o.task} ({o.metric}, {o.direction})' for o in config.objectives)}",
        f"held out      {', '.join(t.task for t in config.held_out.tasks) or 'none'}",
        f"one candidate merge {steady.merge_s:.3f}s + {SEARCH} eval {steady.eval_s:.3f}s; worker start {load_s:.1f}s",
        f"budget        {budget.trials or '∞'} trials, wall time {budget.wall_time or '∞'} s, {workers} worker(s)",
        f"projected     search ~{search_s:.0f}s + final comparison ~{final_s:.0f}s "
        f"(+ Ray and worker start ~{load_s + 10:.0f}s); planning took {time.perf_counter() - started:.0f}s",
    ]
    return "\n".join(lines)
