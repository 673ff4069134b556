"""`evomerge run`: the search loop.

config -> preflight (before Ray) -> genome + optimizer (Optuna storage in the run dir) -> Ray worker pool ->
candidates handed out as soon as a worker is free -> each outcome told to the optimizer and logged to MLflow ->
held-out comparison of the front, the parents and the default recipes -> summary.json, best.yml.

Nothing one candidate does ends the run: a failure is an Outcome like any other, recorded and told to the
optimizer as failed. Everything the search knows lives in the run dir, so `--resume` after a kill continues.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import ray
import yaml
from optuna.trial import TrialState

from evaluators import Evaluator
from merge_core import Recipe
from merge_core.sources import check_compatible, read_info
from search import baselines
from search.config import ConfigError, SearchConfig
from search.execution import Outcome, WorkerPool
from search.export import RESOLVED_CONFIG, export_text
from search.genome import Genome
from search.optimizers import Optimizer, make_optimizer
from search.ray_runtime import start_ray, stop_ray
from search.report import (
    AVERAGE,
    BestModel,
    FrontMember,
    HeldoutEntry,
    ModelScores,
    RunSummary,
    TrialCounts,
    format_table,
    heldout_comparison,
    heldout_scores,
    write_json_atomically,
    write_summary,
    write_text_atomically,
)
from search.statistics import hypervolume, pareto_front
from search.tracking import Tracker
from search.worker import HELDOUT, SEARCH, CandidateWorker, Job, JobResult, WorkerSpec

STORAGE_FILE = "optuna.db"
BEST_FILE = "best.yml"
RECIPES_DIR = "recipes"
HELDOUT_ITEMS = "heldout_items.json"
REPORT_FILE = "report.md"  # the held-out table the run ends by printing


@dataclass(frozen=True)
class Preflight:
    tensor_names: list[str]
    num_layers: int


def preflight(config: SearchConfig) -> Preflight:
    """Everything that can be checked before Ray starts: sources agree, tasks and metrics resolve offline."""
    from merge_core import architecture

    infos = [read_info(ref) for ref in [config.models.base, *config.models.fine_tunes]]
    check_compatible(infos)
    names = list(infos[0].shapes)
    Evaluator(config.eval_config(), config.objective_specs())
    if config.held_out.tasks:
        Evaluator(config.eval_config(), config.held_out_specs())
    return Preflight(tensor_names=names, num_layers=architecture.num_layers(names))


def worker_spec(config: SearchConfig) -> WorkerSpec:
    return WorkerSpec(
        models=(config.models.base, *config.models.fine_tunes),
        device=config.execution.device,
        eval_config=config.eval_config(),
        search_tasks=tuple(config.objective_specs()),
        heldout_tasks=tuple(config.held_out_specs()),
        threads=max(1, (os.cpu_count() or 1) // config.execution.workers),
        trust_remote_code=config.trust_remote_code,
    )


def objective_keys(config: SearchConfig) -> list[str]:
    return [objective.task for objective in config.objectives]


class Search:
    def __init__(self, config: SearchConfig, resume: bool, say: Callable[[str], None] = print):
        self.config, self.say = config, say
        self.run_dir = Path(config.output_dir)
        storage = self.run_dir / STORAGE_FILE
        if storage.exists() and not resume:
            raise ConfigError(
                config.where, "output_dir", f"{self.run_dir} holds a previous search; pass --resume or choose another"
            )
        if resume and not storage.exists():
            raise ConfigError(config.where, "output_dir", f"{self.run_dir} holds no search to resume")
        checked = preflight(config)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RECIPES_DIR).mkdir(exist_ok=True)
        if not resume:
            resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
            (self.run_dir / RESOLVED_CONFIG).write_text(f"# {config.where}, every default filled in\n{resolved}")
        self.genome = Genome(config, checked.tensor_names, checked.num_layers)
        self.directions = config.directions
        self.optimizer: Optimizer = make_optimizer(config, self.genome, storage, self.directions, resume)
        if not resume and config.optimizer.warm_start:
            for x in self.genome.default_candidates():
                self.optimizer.enqueue(x)
        self.tracker = Tracker(config.tracking.mlflow_uri, config.tracking.experiment, self.run_dir)
        self.tracker.start(
            self.run_dir.name, config.model_dump(mode="json"), tags={"evomerge.config": config.where}, resume=resume
        )
        self.asked: dict[int, tuple[np.ndarray, str]] = {}  # trials in flight: number -> (genome, recipe YAML)

    # -- the search phase -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        config = self.config
        execution = config.execution
        own_ray = not ray.is_initialized()  # a caller's Ray (a notebook, a test) is theirs to stop
        start_ray(None if execution.ray_address == "local" else execution.ray_address, self.run_dir, num_cpus=None)
        started = time.monotonic()
        pool = WorkerPool(
            partial(CandidateWorker, worker_spec(config)),
            workers=execution.workers,
            num_cpus=max(0.5, (os.cpu_count() or 1) / execution.workers - 0.25),
            num_gpus=execution.gpus_per_worker,
            trial_timeout_s=execution.trial_timeout,
        )
        try:
            self.search(pool, started)
            summary = self.finish(pool, started)
        except BaseException:
            self.tracker.finish("killed")
            raise
        finally:
            pool.shutdown()
            if own_ray:
                stop_ray()
        self.tracker.finish("complete")
        return summary

    def budget_left(self, started: float) -> bool:
        budget = self.config.budget
        done = self.optimizer.n_done
        if budget.trials is not None and done + len(self.asked) >= budget.trials:
            return False
        return budget.wall_time is None or time.monotonic() - started < budget.wall_time

    def search(self, pool: WorkerPool, started: float) -> None:
        while True:
            while pool.idle() and self.budget_left(started):
                trial = self.optimizer.ask()
                recipe_yaml = self.genome.decode(trial.x).to_yaml()
                # Written before the trial can complete: a kill between the study's record and this file
                # would leave a finished trial whose recipe a resumed run cannot read.
                write_text_atomically(self.run_dir / RECIPES_DIR / f"trial-{trial.number}.yml", recipe_yaml)
                self.asked[trial.number] = (trial.x, recipe_yaml)
                pool.submit(trial.number, Job(recipe_yaml, seed=self.config.seed))
            if not self.asked:
                return
            for outcome in pool.wait(timeout_s=5.0):
                self.record(outcome, started)

    def record(self, outcome: Outcome, started: float) -> None:
        number = outcome.key
        x, recipe_yaml = self.asked.pop(number)
        result: JobResult | None = outcome.value if outcome.ok else None
        values = [result.scores[key] for key in objective_keys(self.config)] if result else None
        if values is not None and not all(np.isfinite(values)):
            values, outcome = None, Outcome(number, False, None, "non-finite score", outcome.seconds, outcome.worker)
        self.optimizer.tell(number, values)
        self.tracker.log_trial(
            number,
            self.optimizer.params(x),
            recipe_yaml,
            dict(zip(objective_keys(self.config), values, strict=True)) if values else None,
            "complete" if values else "failed",
            merge_s=result.merge_s if result else 0.0,
            eval_s=result.eval_s if result else 0.0,
            error=None if values else outcome.error,
        )
        self.progress(number, values, outcome, started)

    def progress(self, number: int, values: list[float] | None, outcome: Outcome, started: float) -> None:
        front = self.front()
        done = self.optimizer.n_done
        budget = self.config.budget.trials
        elapsed = time.monotonic() - started
        eta = f" eta {elapsed / max(done, 1) * (budget - done):.0f}s" if budget else ""
        best = ", ".join(f"{k}={v:.4f}" for k, v in front.best.items()) if front.points.size else "-"
        status = " ".join(f"{v:.4f}" for v in values) if values else f"FAILED ({outcome.error})"
        self.say(
            f"[{done}/{budget or '∞'}] trial {number}: {status} | failed {done - len(front.points)} | best {best}{eta}"
        )
        if values:
            reference = front.reference
            self.tracker.log_step(done, front.best, hypervolume(front.points, self.directions, reference))

    # -- results ----------------------------------------------------------------------------------------------
    def front(self) -> "Front":
        trials = self.completed()
        numbers = list(trials)
        points = np.array([trials[n] for n in numbers], dtype=float).reshape(len(numbers), len(self.directions))
        keys = objective_keys(self.config)
        if not numbers:
            return Front([], points, {}, np.zeros(len(keys)))
        members = [numbers[i] for i in pareto_front(points, self.directions)]
        best = {
            key: float(points[:, i].max() if d == "maximize" else points[:, i].min())
            for i, (key, d) in enumerate(zip(keys, self.directions, strict=True))
        }
        # A fixed reference (the worst score each objective can have for [0, 1] metrics) keeps hypervolumes
        # comparable between steps and runs.
        reference = np.array([0.0 if d == "maximize" else 1.0 for d in self.directions])
        return Front(members, points, best, reference)

    def finish(self, pool: WorkerPool, started: float) -> RunSummary:
        config, keys = self.config, objective_keys(self.config)
        front = self.front()
        completed = self.completed()
        ordered = sorted(front.members, key=lambda n: -float(np.mean(completed[n])))
        base, children = config.models.base, list(config.models.fine_tunes)
        entries: dict[str, tuple[str, Recipe]] = {}
        for model in [base, *children]:
            entries[Path(model).name or model] = ("parent", baselines.parent(model))
        for name, recipe in baselines.default_baselines(base, children).items():
            entries[name] = ("baseline", recipe)
        lam = self.best_single_lambda(pool, base, children)
        entries[f"task arithmetic λ={lam:g} (tuned on search)"] = (
            "baseline",
            baselines.task_arithmetic(base, children, lam),
        )
        for number in ordered:
            entries[f"evolved #{number}"] = ("evolved", Recipe.from_yaml(self.trial_recipe(number)))

        results = self.evaluate_all(pool, {name: recipe for name, (_, recipe) in entries.items()}, HELDOUT)
        held = [
            HeldoutEntry(name, kind, results[name].per_item) for name, (kind, _) in entries.items() if name in results
        ]
        # Per-item scores stay with the run, so any other pairing can be computed later (experiments do).
        write_json_atomically(self.run_dir / HELDOUT_ITEMS, {name: r.per_item for name, r in results.items()})
        rows = heldout_comparison(held, seed=config.seed) if config.held_out.tasks else []
        scores = heldout_scores(rows)
        table = format_table(rows) if rows else "(no held-out tasks configured)"
        members = [
            FrontMember(
                trial=n,
                recipe=f"{RECIPES_DIR}/trial-{n}.yml",
                search=dict(zip(keys, completed[n], strict=True)),
                heldout=scores.get(f"evolved #{n}", {}),
            )
            for n in ordered
        ]
        best = None
        if members:
            average = [r for r in rows if r.task == AVERAGE and r.entry == f"evolved #{members[0].trial}"]
            row = average[0] if average else None
            best = BestModel(
                **members[0].model_dump(),
                chosen_by="highest mean search score on the front",
                best_parent=row.best_parent if row else None,
                vs_parent=row.vs_parent if row else None,
                best_baseline=row.best_baseline if row else None,
                vs_baseline=row.vs_baseline if row else None,
            )
            (self.run_dir / BEST_FILE).write_text(export_text(self.trial_recipe(best.trial), config.seed))
        summary = RunSummary(
            parents=[ModelScores(name=n, heldout=scores.get(n, {})) for n, (k, _) in entries.items() if k == "parent"],
            baselines=[
                ModelScores(name=n, heldout=scores.get(n, {})) for n, (k, _) in entries.items() if k == "baseline"
            ],
            front=members,
            best=best,
            trials=TrialCounts(complete=len(completed), failed=self.optimizer.n_done - len(completed)),
            wall_s=time.monotonic() - started,
        )
        write_summary(self.run_dir, summary)
        self.tracker.log_front(
            [
                {"trial": m.trial, "recipe": self.trial_recipe(m.trial), **m.search, **_prefixed(m.heldout)}
                for m in members
            ],
            keys,
            self.directions,
        )
        if rows:
            self.tracker.log_heldout(rows)
        write_text_atomically(self.run_dir / REPORT_FILE, f"# held-out comparison\n\n```\n{table}\n```\n")
        self.say(table)
        self.say(f"summary: {self.run_dir / 'summary.json'}  best recipe: {self.run_dir / BEST_FILE}")
        self.say(f"open the runs: {self.tracker.ui_command()}")
        return summary

    def completed(self) -> dict[int, list[float]]:
        """Every complete trial's objective values, by trial number (from the study: resumed runs too)."""
        trials = self.optimizer.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {trial.number: list(trial.values) for trial in trials}

    def trial_recipe(self, number: int) -> str:
        return (self.run_dir / RECIPES_DIR / f"trial-{number}.yml").read_text()

    def best_single_lambda(self, pool: WorkerPool, base: str, children: list[str]) -> float:
        """The one-knob baseline a per-layer genome must beat: task arithmetic's λ tuned on the search split."""
        grid = {f"λ={lam:g}": baselines.task_arithmetic(base, children, lam) for lam in baselines.LAMBDA_GRID}
        results = self.evaluate_all(pool, grid, SEARCH)
        keys = objective_keys(self.config)
        sign = np.array([1.0 if d == "maximize" else -1.0 for d in self.directions])
        fitness = {name: float(np.mean(sign * [r.scores[k] for k in keys])) for name, r in results.items()}
        best = max(fitness, key=fitness.__getitem__)
        return float(best.removeprefix("λ="))

    def evaluate_all(self, pool: WorkerPool, recipes: dict[str, Recipe], split: str) -> dict[str, JobResult]:
        """Score named recipes on the pool (keys below zero never collide with trial numbers)."""
        names = list(recipes)
        for index, name in enumerate(names):
            pool.submit(-1 - index, Job(recipes[name].to_yaml(), seed=self.config.seed, split=split))
        results: dict[str, JobResult] = {}
        while pool.pending():
            for outcome in pool.wait(timeout_s=5.0):
                name = names[-1 - outcome.key]
                if outcome.ok:
                    results[name] = outcome.value
                else:
                    self.say(f"{name}: evaluation failed ({outcome.error}); left out of the comparison")
        return results


@dataclass(frozen=True)
class Front:
    members: list[int]
    points: np.ndarray
    best: dict[str, float]
    reference: np.ndarray


def _prefixed(heldout: dict[str, float]) -> dict[str, float]:
    return {f"heldout.{task}": value for task, value in heldout.items()}


def run_search(config_path: Path, resume: bool = False, say: Callable[[str], None] = print) -> RunSummary:
    config = SearchConfig.from_yaml(config_path)
    return Search(config, resume, say).run()
