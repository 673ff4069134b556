"""The after-search steps on a fake `evaluate` (fixed scores per recipe name): the tuned baselines, the gate and
what it writes to best.yml, summary.json, report.md and MLflow. No Ray, no model: real RunDir and MLflow."""

import re
import time

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from merge_core import Recipe
from search.cli import main
from search.config import SearchConfig
from search.execution.worker import HELDOUT, SEARCH, JobResult
from search.fitness import Objectives
from search.results import baselines
from search.results.export import export_recipe
from search.results.final import FinalComparison, Tuning
from search.results.front import Front
from search.results.heldout import AVERAGE, CEILING
from search.results.summary import Gate, read_summary
from search.results.tracking import GATE_TAG, Tracker
from search.run_dir import RunDir

BASE, CHILDREN = "toy/base", ["toy/rev", "toy/srt"]
HELD_OUT = ("t_rev", "t_srt")


def correct_on(count: int, total: int = 10) -> list[float]:
    return [1.0] * count + [0.0] * (total - count)


# Held-out items per entry; every entry not named here scores 3/10 on both tasks.
HELDOUT_ITEMS = {
    "base": {"t_rev": correct_on(2), "t_srt": correct_on(2)},
    "rev": {"t_rev": correct_on(8), "t_srt": correct_on(1)},
    "srt": {"t_rev": correct_on(1), "t_srt": correct_on(9)},
    "evolved #0": {"t_rev": correct_on(7), "t_srt": correct_on(6)},
}


def fake_evaluate(search_scores: dict[str, float], calls: list):
    """Search split: `search_scores[name]` (0.1 when not named); held out: HELDOUT_ITEMS. Records every call."""

    def evaluate(recipes: dict[str, Recipe], split: str) -> dict[str, JobResult]:
        calls.append((split, dict(recipes)))
        if split == SEARCH:
            scores = {name: {"toy_search": search_scores.get(name, 0.1)} for name in recipes}
            return {name: JobResult(scores[name], {"toy_search": [0.0] * 4}, 0.0, 0.0) for name in recipes}
        assert split == HELDOUT
        items = {name: HELDOUT_ITEMS.get(name, dict.fromkeys(HELD_OUT, correct_on(3))) for name in recipes}
        return {
            name: JobResult({task: float(np.mean(v)) for task, v in items[name].items()}, items[name], 0.0, 0.0)
            for name in recipes
        }

    return evaluate


def two_logged_trials(config: SearchConfig, tracking_uri: str, experiment: str) -> tuple[RunDir, Tracker]:
    """A run directory with the config and two TIES trials (densities 0.42, 0.61) logged to a started tracker."""
    run = RunDir.create(config.output_dir, "search.yml")
    run.write_text(run.resolved_config, yaml.safe_dump(config.model_dump(mode="json")))
    tracker = Tracker(tracking_uri, experiment, run.tracking)
    tracker.start("run", config.model_dump(mode="json"))
    for number, density in enumerate((0.42, 0.61)):
        recipe_yaml = baselines.task_vectors("ties", BASE, CHILDREN, density=density).to_yaml()
        run.write_text(run.trial_recipe(number), recipe_yaml)
        tracker.log_trial(number, {"density": density}, recipe_yaml, {"toy_search": 0.0}, "complete", 0.0, 0.0)
    return run, tracker


@pytest.fixture
def setup(tmp_path, tracking_uri, request):
    """A config, a run directory with two trials' recipes, and a started tracker; `final(scores)` builds the step."""
    config = SearchConfig.from_dict(
        {
            "models": {"base": BASE, "fine_tunes": CHILDREN},
            "merge": {"method": "ties"},
            "objectives": [{"task": "toy_search", "metric": "acc"}],
            "held_out": {"tasks": [{"task": task, "metric": "acc"} for task in HELD_OUT]},
            "tracking": {"mlflow_uri": tracking_uri, "experiment": request.node.name},
            "output_dir": str(tmp_path / "run"),
            "seed": 5,
        }
    )
    run, tracker = two_logged_trials(config, tracking_uri, request.node.name)
    said: list[str] = []
    calls: list = []

    def final(search_scores: dict[str, float]) -> FinalComparison:
        evaluate = fake_evaluate(search_scores, calls)
        return FinalComparison(config, run, Objectives.of(config), tracker, evaluate, time.monotonic(), said.append)

    return run, tracker, final, said, calls


def finish(final: FinalComparison, trial_scores: dict[int, float]):
    completed = {number: [score] for number, score in trial_scores.items()}
    front = Front.of(completed, final.objectives)
    return final.run(front, completed, len(completed), dict.fromkeys(completed, 40))


def test_tuning_keeps_each_familys_grid_point_of_highest_mean_fitness(setup):
    _, _, final, _, calls = setup
    scores = {
        "task arithmetic λ=0.4": 0.5,
        "task arithmetic λ=0.6": 0.5,  # a tie: the first grid point wins
        "ties d=0.3 λ=0.5": 0.55,
        "ties d=0.7 λ=0.75": 0.6,
        "ties d=0.9 λ=1": float("nan"),  # a non-finite score drops out instead of winning
        "dare-ties d=0.9 w=0.5": 0.45,
        "srt": 0.3,
    }
    tuning = final(scores).tune()
    # One batch on the search split: the 3 parents and every grid point (10 λ + 4 × 3 TIES + 4 × 3 DARE-TIES).
    assert [split for split, _ in calls] == [SEARCH] and len(calls[0][1]) == 3 + 10 + 12 + 12
    task_arithmetic = baselines.task_vectors("task_arithmetic", BASE, CHILDREN, lam=0.4)
    ties = baselines.task_vectors("ties", BASE, CHILDREN, density=0.7, lam=0.75)
    dare_ties = baselines.task_vectors("dare_ties", BASE, CHILDREN, weight=0.5, density=0.9)
    assert tuning == Tuning(
        parents={"base": 0.1, "rev": 0.1, "srt": 0.3},
        tuned={
            "task arithmetic λ=0.4 (tuned on search)": (task_arithmetic, 0.5),
            "ties d=0.7 λ=0.75 (tuned on search)": (ties, 0.6),
            "dare-ties d=0.9 w=0.5 (tuned on search)": (dare_ties, 0.45),
        },
    )
    assert calls[0][1]["srt"] == baselines.parent("toy/srt")


@pytest.mark.parametrize(
    ("scores", "chosen", "unbeaten"),
    [
        # the best parent is the stronger reference: best.yml is that parent
        ({"srt": 0.7, "ties d=0.5 λ=1": 0.6}, "srt", "the best parent srt (0.7000) and the best tuned baseline"),
        # the evolved recipe beats every parent but not the tuned TIES: best.yml is the tuned TIES recipe
        ({"srt": 0.3, "ties d=0.5 λ=1": 0.6}, "ties d=0.5 λ=1 (tuned on search)", "the best tuned baseline"),
    ],
)
def test_a_losing_search_gates_best_yml_to_the_stronger_reference(setup, scores, chosen, unbeaten, capsys):
    run, tracker, final, said, _ = setup
    summary = finish(final(scores), {0: 0.5, 1: 0.4})
    reason = (
        f"evolved #0 (mean search fitness 0.5000) does not beat {unbeaten} ties d=0.5 λ=1 (tuned on search) (0.6000)"
    )
    assert summary.gate == Gate(passed=False, reason=reason, chosen=chosen)
    assert read_summary(run).gate == summary.gate
    recipes = {
        "srt": baselines.parent("toy/srt"),
        "ties d=0.5 λ=1 (tuned on search)": baselines.task_vectors("ties", BASE, CHILDREN, density=0.5),
    }
    best = run.best.read_text()
    assert Recipe.from_yaml(best) == recipes[chosen]
    assert best.startswith(f"# not evolved: {chosen}, because {reason}\n# `evomerge export RUN_DIR --evolved`")
    assert export_recipe(run.path) == best  # export reproduces the gate's choice from summary.json
    evolved = Recipe.from_yaml(run.read_text(run.trial_recipe(0)))
    assert Recipe.from_yaml(export_recipe(run.path, evolved=True)) == evolved
    assert main(["export", str(run.path), "--evolved"]) == 0
    assert Recipe.from_yaml(capsys.readouterr().out) == evolved
    line = f"gate failed: {reason}; best.yml is {chosen} instead (evomerge export {run.path} --evolved writes"
    assert said[-1].startswith(line) and said[-1] in run.report.read_text()
    tags = MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id).data.tags
    assert tags[GATE_TAG] == f"failed: {reason}"


def test_a_winning_search_passes_the_gate_and_best_yml_is_evolved(setup):
    run, tracker, final, said, calls = setup
    summary = finish(final({"srt": 0.7, "ties d=0.5 λ=1": 0.6}), {0: 0.8, 1: 0.4})
    reason = (
        "evolved #0 (mean search fitness 0.8000) beats the best parent srt (0.7000) "
        "and the best tuned baseline ties d=0.5 λ=1 (tuned on search) (0.6000)"
    )
    assert summary.gate == Gate(passed=True, reason=reason, chosen="evolved #0")
    best = run.best.read_text()
    assert best.startswith("# evolved by evomerge\n") and best == export_recipe(run.path)
    assert Recipe.from_yaml(best) == Recipe.from_yaml(run.read_text(run.trial_recipe(0)))
    assert said[-1] == f"gate passed: {reason}; best.yml is evolved #0"
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id).data.tags[GATE_TAG] == f"passed: {reason}"
    # Held out: parents, 3 defaults, 3 tuned baselines and the front (trial 1 is dominated), in one batch.
    assert [split for split, _ in calls] == [SEARCH, HELDOUT]
    assert list(calls[1][1]) == [
        "base",
        "rev",
        "srt",
        "linear average",
        "ties d=0.5 w=1",
        "task arithmetic λ=1",
        "task arithmetic λ=0.1 (tuned on search)",  # every λ scored 0.1: the first grid point
        "ties d=0.5 λ=1 (tuned on search)",
        "dare-ties d=0.3 w=0.5 (tuned on search)",
        "evolved #0",
    ]
    # The ceiling by hand: rev's 0.8 on t_rev, srt's 0.9 on t_srt -> average 0.85; the best parent on average is
    # srt at (0.1 + 0.9) / 2 = 0.5; evolved #0 scores (0.7 + 0.6) / 2 = 0.65 -> share (0.65 - 0.5) / (0.85 - 0.5).
    assert summary.ceiling.name == CEILING
    assert summary.ceiling.heldout == pytest.approx({"t_rev": 0.8, "t_srt": 0.9, AVERAGE: 0.85})
    assert summary.best.ceiling_share == pytest.approx(0.15 / 0.35)
    assert summary.best.best_parent == "srt"  # evolved rows are never compared with the ceiling
    assert {b.name: Recipe.from_yaml(b.recipe) for b in summary.baselines}["ties d=0.5 λ=1 (tuned on search)"] == (
        baselines.task_vectors("ties", BASE, CHILDREN, density=0.5)
    )
    assert re.search(rf"\n{AVERAGE} +{CEILING} +ceiling +0\.850 +20\n", run.report.read_text())
