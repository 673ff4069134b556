"""`evomerge run`: the search loop, composed from the rooms.

config -> preflight (execution/preflight.py, before Ray or a run dir) -> RunDir -> genome (genome/) + optimizer
(optimizers/, Optuna storage in the run dir) -> Ray worker pool (execution/) -> candidates handed out as soon
as a worker is free -> each outcome turned into objective values (fitness/), told to the optimizer and logged
(results/tracking.py) -> the final held-out comparison (results/final.py).

Nothing one candidate does ends the run: a failure is an Outcome like any other, recorded and told to the
optimizer as failed. Everything the search knows lives in the run dir, so `--resume` after a kill continues.
"""

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import ray
import yaml
from optuna.trial import TrialState

from merge_core import Recipe
from search.config import SearchConfig
from search.execution.pool import Outcome, WorkerPool
from search.execution.preflight import preflight, worker_spec
from search.execution.ray_runtime import start_ray, stop_ray
from search.execution.worker import CandidateWorker, Job, JobResult
from search.fitness import Objectives
from search.genome import Genome
from search.optimizers import Optimizer, check_fits, make_optimizer
from search.optimizers.base import INTERRUPTED, ITEMS
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
        self.genome = Genome(config, checked.tensor_names, checked.num_layers)
        check_fits(config, self.genome)  # its size is known only now; still before the run dir and Ray
        self.run_dir = RunDir.open(config.output_dir) if resume else RunDir.create(config.output_dir, config.where)
        if not resume:
            resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
            self.run_dir.write_text(
                self.run_dir.resolved_config, f"# {config.where}, every default filled in\n{resolved}"
            )
        self.objectives = Objectives.of(config)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO ('A new study created') is no progress
        self.optimizer: Optimizer = make_optimizer(config, self.genome, self.run_dir, resume)
        if not resume and config.optimizer.warm_start:
            for x in self.genome.default_candidates():
                self.optimizer.enqueue(x)
        self.tracker = Tracker(config.tracking.mlflow_uri, config.tracking.experiment, self.run_dir.tracking)
        self.tracker.start(
            self.run_dir.path.name,
            config.model_dump(mode="json"),
            tags={"evomerge.config": config.where},
            resume=resume,
        )
        if resume:
            self.log_unlogged_trials()
        self.asked: dict[int, tuple[np.ndarray, str]] = {}  # trials in flight: number -> (genome, recipe YAML)
        self.items = sum(self.optimizer.spent.values())  # items the study's finished trials cost, resumed too
        self.trials = reporter.task("search", config.budget.trials, "trials", done=self.optimizer.n_done)

    def log_unlogged_trials(self) -> None:
        """A kill between the study's record of a trial and its MLflow child run leaves a finished trial that
        MLflow never saw: log it now from the study and its recipe file (its merge and eval seconds are lost)."""
        study = self.optimizer.study
        interrupted = set(study.user_attrs.get(INTERRUPTED, []))  # re-queued under new numbers, never finished
        spent = self.optimizer.spent
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if trial.number in interrupted or self.tracker.has_trial(trial.number):
                continue
            complete = trial.state == TrialState.COMPLETE
            self.tracker.log_trial(
                trial.number,
                trial.params,
                self.run_dir.read_text(self.run_dir.trial_recipe(trial.number)),
                dict(zip(self.objectives.keys, trial.values, strict=True)) if complete else None,
                "complete" if complete else "failed",
                merge_s=0.0,
                eval_s=0.0,
                error=None if complete else "reason lost: the run was killed before logging this trial",
                items=spent.get(trial.number),
            )

    # -- the search phase -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        config = self.config
        execution = config.execution
        own_ray = not ray.is_initialized()  # a caller's Ray (a notebook, a test) is theirs to stop
        address = None if execution.ray_address == "local" else execution.ray_address
        start_ray(address, self.run_dir.ray_link, num_cpus=None)
        started = time.monotonic()
        pool = WorkerPool(
            partial(CandidateWorker, worker_spec(config)),
            workers=execution.workers,
            num_cpus=max(0.5, (os.cpu_count() or 1) / execution.workers - 0.25),
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
            summary = final.run(front, self.completed(), self.optimizer.n_done, self.optimizer.spent)
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
        if budget.trials is not None and done + len(self.asked) >= budget.trials:
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
                self.asked[trial.number] = (trial.x, recipe_yaml)
                pool.submit(trial.number, Job(recipe_yaml, seed=self.config.seed))
            if not self.asked:
                return
            for outcome in pool.wait(timeout_s=5.0):
                self.record(outcome)

    def record(self, outcome: Outcome) -> None:
        number = outcome.key
        x, recipe_yaml = self.asked.pop(number)
        result: JobResult | None = outcome.value if outcome.ok else None
        values = self.objectives.values(result.scores) if result else None
        error = outcome.error if result is None else None if values else "non-finite score"
        # A failed candidate whose scores came back (non-finite) was paid for; one that crashed: unknown, 0.
        self.optimizer.tell(number, values, {ITEMS: result.items if result else 0})
        self.tracker.log_trial(
            number,
            self.optimizer.params(x),
            recipe_yaml,
            dict(zip(self.objectives.keys, values, strict=True)) if values else None,
            "complete" if values else "failed",
            merge_s=result.merge_s if result else 0.0,
            eval_s=result.eval_s if result else 0.0,
            error=error,
            items=result.items if result else None,
        )
        front = Front.of(self.completed(), self.objectives)
        self.progress(number, result, values, error, front)
        if values:
            self.tracker.log_step(self.optimizer.n_done, front.best, front.hypervolume)

    def progress(
        self, number: int, result: JobResult | None, values: list[float] | None, error: str | None, front: Front
    ) -> None:
        self.items += result.items if result else 0
        status = " ".join(f"{v:.4f}" for v in values) if values else f"FAILED ({error})"
        self.trials.advance(
            1,
            f"trial {number}: {status}",
            failed=self.optimizer.n_done - len(front.points),
            items=self.items,
            best=", ".join(f"{k}={v:.4f}" for k, v in front.best.items()) if front.best else "-",
        )

    def completed(self) -> dict[int, list[float]]:
        """Every complete trial's objective values, by trial number (from the study: resumed runs too)."""
        trials = self.optimizer.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {trial.number: list(trial.values) for trial in trials}

    def evaluate(self, pool: WorkerPool, recipes: dict[str, Recipe], split: str) -> dict[str, JobResult]:
        """Score named recipes on the pool (keys below zero never collide with trial numbers)."""
        names = list(recipes)
        scored = self.reporter.task(f"scoring on the {split} split", len(names), "entries")
        for index, name in enumerate(names):
            pool.submit(-1 - index, Job(recipes[name].to_yaml(), seed=self.config.seed, split=split))
        results: dict[str, JobResult] = {}
        while pool.pending():
            for outcome in pool.wait(timeout_s=5.0):
                name = names[-1 - outcome.key]
                scored.advance(1)
                if outcome.ok:
                    results[name] = outcome.value
                else:
                    self.say(f"{name}: evaluation failed ({outcome.error}); left out of the comparison")
        return results


def run_search(config_path: Path, resume: bool = False, say: Callable[[str], None] | None = None) -> RunSummary:
    """Run a search, showing its progress: plain lines through `say` (print, a list's append), or by default
    on the terminal (live when stdout is one)."""
    config = SearchConfig.from_yaml(config_path)
    with Progress(say) as reporter:
        return Search(config, resume, reporter).run()
