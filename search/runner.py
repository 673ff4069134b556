"""`evomerge run`: the search loop, composed from the rooms.

config -> preflight (execution/preflight.py, before Ray or a run dir) -> RunDir -> genome (genome/) + optimizer
(optimizers/, Optuna storage in the run dir) -> Ray worker pool (execution/) -> candidates handed out as soon
as a worker is free -> each outcome turned into objective values (fitness/), told to the optimizer and logged
(results/tracking.py) -> the final held-out comparison (results/final.py).

Nothing one candidate does ends the run: a failure is an Outcome like any other, recorded and told to the
optimizer as failed. Everything the search knows lives in the run dir, so `--resume` after a kill continues.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import ray
import yaml
from optuna.trial import TrialState

from merge_core import InputError, Recipe
from search.config import SearchConfig
from search.execution.pool import Outcome, WorkerPool
from search.execution.preflight import preflight, worker_spec
from search.execution.ray_runtime import start_ray, stop_ray, worker_cpus
from search.execution.worker import SEARCH, CandidateWorker, Job, JobResult
from search.fitness import Objectives
from search.fitness.rungs import RUNG_FITNESS, Rungs
from search.fitness.score_cache import ScoreCache, combine, recipe_key
from search.genome import make_genome, trial_line
from search.genome.coarse import coarse_grid
from search.optimizers import Optimizer, check_fits, make_optimizer
from search.optimizers.base import FINISHED, INTERRUPTED, ITEMS
from search.progress import Progress
from search.results.final import FinalComparison
from search.results.front import Front
from search.results.summary import RunSummary
from search.results.tracking import Tracker
from search.run_dir import RunDir


class Search:
    def __init__(self, config: SearchConfig, resume: bool, reporter: Progress):
        self.config, self.reporter, self.say = config, reporter, reporter.line
        RunDir(config.output_dir).expect_search(resume, config.where)
        checked = preflight(config)  # before the run dir exists: bad input leaves nothing behind
        self.memory = checked.memory
        self.genome = make_genome(config, checked.tensor_names, checked.num_layers)
        check_fits(config, self.genome)  # its size is known only now; still before the run dir and Ray
        self.run_dir = RunDir.open(config.output_dir) if resume else RunDir.create(config.output_dir, config.where)
        if not resume:
            resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
            self.run_dir.write_text(
                self.run_dir.resolved_config, f"# {config.where}, every default filled in\n{resolved}"
            )
            if checked.stage1 is not None:  # what export writes as the first of the two stages
                self.run_dir.write_text(self.run_dir.stage1, checked.stage1.to_yaml())
        self.objectives = Objectives.of(config)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO ('A new study created') is no progress
        self.optimizer: Optimizer = make_optimizer(config, self.genome, self.run_dir, resume)
        if not resume:
            # Path and MoE genomes have no one-knob grid: their coarse stage is the warm starts alone.
            weights = config.optimizer.coarse_to_fine and config.genome.kind == "ps"
            starts = coarse_grid(self.genome) if weights else []
            starts += self.genome.default_candidates() if config.optimizer.warm_start else []
            for x in starts:
                self.optimizer.enqueue(x)  # a genome already queued is skipped
        self.tracker = Tracker(config.tracking.mlflow_uri, config.tracking.experiment, self.run_dir.tracking)
        self.tracker.start(
            self.run_dir.path.name,
            config.model_dump(mode="json"),
            tags={"evomerge.config": config.where},
            resume=resume,
        )
        if resume:
            self.log_unlogged_trials()
        self.rungs = Rungs(tuple(config.fitness.rungs or [config.fitness.limit or 0]), config.fitness.promote)
        self.cache = ScoreCache(self.run_dir)
        self.flight: dict[int, Candidate] = {}  # being scored: trial numbers, and after-search requests below 0
        self.answers: dict[int, JobResult | str] = {}  # finished after-search requests: a result or the error
        self.rung_fitness = self.optimizer.rung_fitness()  # every trial's fitness per rung, resumed ones too
        self.items = sum(self.optimizer.spent.values())  # items the study's finished trials cost, resumed too
        self.trials = reporter.task("search", config.budget.trials, "trials", done=self.optimizer.n_done)

    def log_unlogged_trials(self) -> None:
        """A kill between the study's record of a trial and its MLflow child run leaves a finished trial that
        MLflow never saw: log it now from the study and its recipe file (its merge and eval seconds are lost)."""
        study = self.optimizer.study
        interrupted = set(study.user_attrs.get(INTERRUPTED, []))  # re-queued under new numbers, never finished
        spent = self.optimizer.spent
        status = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "stopped", TrialState.FAIL: "failed"}
        for trial in study.get_trials(deepcopy=False, states=FINISHED):
            if trial.number in interrupted or self.tracker.has_trial(trial.number):
                continue
            failed = trial.state == TrialState.FAIL
            self.tracker.log_trial(
                trial.number,
                trial.params,
                self.run_dir.read_text(self.run_dir.trial_recipe(trial.number)),
                dict(zip(self.objectives.keys, trial.values, strict=True)) if trial.values else None,
                status[trial.state],
                merge_s=0.0,
                eval_s=0.0,
                error="reason lost: the run was killed before logging this trial" if failed else None,
                items=spent.get(trial.number),
                path=trial_line(self.config, self.run_dir.read_text(self.run_dir.trial_recipe(trial.number))),
            )

    # -- the search phase -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        config = self.config
        execution = config.execution
        own_ray = not ray.is_initialized()  # a caller's Ray (a notebook, a test) is theirs to stop
        address = None if execution.ray_address == "local" else execution.ray_address
        start_ray(address, self.run_dir.ray_link, num_cpus=None)
        try:
            num_cpus = worker_cpus(config)
        except InputError:
            if own_ray:
                stop_ray()
            raise
        started = time.monotonic()
        pool = WorkerPool(
            partial(CandidateWorker, worker_spec(config, self.memory)),
            workers=execution.workers,
            num_cpus=num_cpus,
            num_gpus=execution.gpus_per_worker,
            trial_timeout_s=execution.trial_timeout,
            # A cluster's workers write on their own nodes: there, Ray's per-node logs keep what they print.
            worker_log=self.run_dir.worker_log if address is None else None,
        )
        try:
            self.search(pool, started)
            evaluate = partial(self.evaluate, pool)
            final = FinalComparison(config, self.run_dir, self.objectives, self.tracker, evaluate, started, self.say)
            front = Front.of(self.completed(), self.objectives)
            done, completed = self.optimizer.n_done, self.completed()
            stopped = done - len(completed) - self.optimizer.n_failed
            summary = final.run(front, completed, done, self.optimizer.spent, stopped)
        except BaseException:
            self.tracker.finish("killed")
            raise
        finally:
            pool.shutdown()
            if own_ray:
                stop_ray()
        self.tracker.finish("complete")
        self.say(f"summary: {self.run_dir.summary}  best recipe: {self.run_dir.best}")
        self.say(f"open the dashboard: evomerge ui {self.run_dir.path}")
        return summary

    def budget_left(self, started: float) -> bool:
        budget = self.config.budget
        done = self.optimizer.n_done
        trials_in_flight = sum(number >= 0 for number in self.flight)
        if budget.trials is not None and done + trials_in_flight >= budget.trials:
            return False
        # From the study, so a resumed run counts what it paid before the kill; candidates in flight count
        # nothing yet, so the last ones may finish past the budget.
        if budget.item_evals is not None and sum(self.optimizer.spent.values()) >= budget.item_evals:
            return False
        return budget.wall_time is None or time.monotonic() - started < budget.wall_time

    def search(self, pool: WorkerPool, started: float) -> None:
        while True:
            while pool.idle() and self.budget_left(started):
                trial = self.optimizer.ask()
                recipe_yaml = self.genome.decode(trial.x).to_yaml()
                # Written before the trial can complete: a kill between the study's record and this file
                # would leave a finished trial whose recipe a resumed run cannot read.
                self.run_dir.write_text(self.run_dir.trial_recipe(trial.number), recipe_yaml)
                self.start(pool, trial.number, Candidate(recipe_yaml, SEARCH, self.rungs.top, trial.x))
            if not self.flight:
                return
            for outcome in pool.wait(timeout_s=5.0):
                self.scored(pool, outcome)

    # -- one candidate, part by part ------------------------------------------------------------------------
    def start(self, pool: WorkerPool, key: int, candidate: "Candidate") -> None:
        candidate.cache_key = recipe_key(candidate.recipe_yaml, self.config.seed)
        self.flight[key] = candidate
        self.advance(pool, key)

    def advance(self, pool: WorkerPool, key: int) -> None:
        """Take the candidate's next parts from the cache while it has them, deciding after each whether the
        candidate is done; then submit the first part the cache lacks."""
        candidate = self.flight[key]
        cached = self.cache.parts(candidate.cache_key, candidate.split)
        while not (candidate.parts and self.done(key)):
            part = len(candidate.parts)
            if part >= len(cached):
                job = Job(candidate.recipe_yaml, seed=self.config.seed, split=candidate.split, part=part)
                pool.submit(key, job)
                return
            candidate.parts.append(cached[part])
            candidate.fresh.append(False)

    def scored(self, pool: WorkerPool, outcome: Outcome) -> None:
        candidate = self.flight[outcome.key]
        candidate.node, candidate.worker = outcome.node or candidate.node, outcome.worker or candidate.worker
        if not outcome.ok:
            self.finish(outcome.key, None, outcome.error)
            return
        self.cache.add(candidate.cache_key, candidate.split, len(candidate.parts), outcome.value)
        candidate.parts.append(outcome.value)
        candidate.fresh.append(True)
        self.advance(pool, outcome.key)

    def done(self, key: int) -> bool:
        """After each part: an after-search request is done at its last part; a trial when the rungs stop it."""
        candidate = self.flight[key]
        rung = len(candidate.parts) - 1
        if key < 0:
            if rung < candidate.last:
                return False
            self.finish(key, combine(candidate.parts, candidate.fresh), None)
            return True
        result = combine(candidate.parts, candidate.fresh)
        values = self.objectives.values(result.scores)
        if values is None:
            self.finish(key, result, "non-finite score")
            return True
        fitness = self.objectives.mean_fitness(values)
        others = [f[rung] for n, f in self.rung_fitness.items() if n != key and len(f) > rung]
        self.rung_fitness.setdefault(key, []).append(fitness)
        if self.rungs.goes_on(rung, fitness, others):
            self.optimizer.note(key, {RUNG_FITNESS: self.rung_fitness[key]})
            return False
        self.finish(key, result, None)
        return True

    def finish(self, key: int, result: JobResult | None, error: str | None) -> None:
        candidate = self.flight.pop(key)
        if key < 0:
            self.answers[key] = result if error is None else error
            return
        number, rung = key, len(candidate.parts) - 1
        # Items scored for it, cache answers excepted: a crash pays for the parts that came back before it.
        items = sum(part.items for part, fresh in zip(candidate.parts, candidate.fresh, strict=True) if fresh)
        values = None if error else self.objectives.values(result.scores)
        stopped_at = self.rungs.sizes[rung] if values and rung < self.rungs.top else None
        attrs = {ITEMS: items} | ({RUNG_FITNESS: self.rung_fitness[number]} if number in self.rung_fitness else {})
        self.optimizer.tell(number, values, attrs, stopped_at=stopped_at)
        status = "failed" if not values else "stopped" if stopped_at else "complete"
        self.tracker.log_trial(
            number,
            self.optimizer.params(candidate.x),
            candidate.recipe_yaml,
            dict(zip(self.objectives.keys, values, strict=True)) if values else None,
            status,
            merge_s=sum(p.merge_s for p, fresh in zip(candidate.parts, candidate.fresh, strict=True) if fresh),
            eval_s=sum(p.eval_s for p, fresh in zip(candidate.parts, candidate.fresh, strict=True) if fresh),
            error=error,
            items=items if result is not None or items else None,
            fidelity=self.rungs.sizes[rung] if values and self.rungs.top else None,
            node=candidate.node or None,
            worker=candidate.worker or None,
            path=trial_line(self.config, candidate.recipe_yaml),
        )
        front = Front.of(self.completed(), self.objectives)
        self.progress(number, items, values, error, stopped_at, front)
        if values and not stopped_at:
            self.tracker.log_step(self.optimizer.n_done, front.best, front.hypervolume)

    def progress(
        self,
        number: int,
        items: int,
        values: list[float] | None,
        error: str | None,
        stopped_at: int | None,
        front: Front,
    ) -> None:
        self.items += items
        status = " ".join(f"{v:.4f}" for v in values) if values else f"FAILED ({error})"
        stopped = f" (stopped at the {stopped_at}-item rung)" if stopped_at else ""
        self.trials.advance(
            1,
            f"trial {number}: {status}{stopped}",
            failed=self.optimizer.n_failed,
            items=self.items,
            best=", ".join(f"{k}={v:.4f}" for k, v in front.best.items()) if front.best else "-",
        )

    def completed(self) -> dict[int, list[float]]:
        """Every complete trial's objective values, by trial number (from the study: resumed runs too). Trials
        stopped at a cheaper rung are not here: their scores are of fewer items, never ranked with these."""
        trials = self.optimizer.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {trial.number: list(trial.values) for trial in trials}

    def evaluate(self, pool: WorkerPool, recipes: dict[str, Recipe], split: str) -> dict[str, JobResult]:
        """Score named recipes on the pool, on every part of `split` (keys below zero never collide with trial
        numbers); what the score cache holds is not scored again."""
        names = list(recipes)
        scored = self.reporter.task(f"scoring on the {split} split", len(names), "entries")
        last = self.rungs.top if split == SEARCH else 0
        for index, name in enumerate(names):
            self.start(pool, -1 - index, Candidate(recipes[name].to_yaml(), split, last))
        while self.flight:
            for outcome in pool.wait(timeout_s=5.0):
                self.scored(pool, outcome)
            if len(self.answers) > scored.done:
                scored.advance(len(self.answers) - scored.done)
        results: dict[str, JobResult] = {}
        for index, name in enumerate(names):
            answer = self.answers.pop(-1 - index)
            if isinstance(answer, JobResult):
                results[name] = answer
            else:
                self.say(f"{name}: evaluation failed ({answer}); left out of the comparison")
        return results


@dataclass
class Candidate:
    """A recipe being scored on one split, part by part (a trial's parts are its fitness rungs)."""

    recipe_yaml: str
    split: str
    last: int  # the last part it may need: a trial stops earlier when the rungs say so
    x: np.ndarray | None = None  # a trial's genome; None for an after-search request
    cache_key: str = ""
    parts: list[JobResult] = field(default_factory=list)  # parts 0.. scored so far, in order
    fresh: list[bool] = field(default_factory=list)  # per part: scored for this request (else the cache's)
    node: str = ""  # the Ray node its last scored part ran on, and the worker
    worker: str = ""


def run_search(config_path: Path, resume: bool = False, say: Callable[[str], None] | None = None) -> RunSummary:
    """Run a search, showing its progress: plain lines through `say` (print, a list's append), or by default
    on the terminal (live when stdout is one)."""
    config = SearchConfig.from_yaml(config_path)
    with Progress(say) as reporter:
        return Search(config, resume, reporter).run()
