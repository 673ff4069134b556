"""The search end to end on the toy test family: real Ray, Optuna, MLflow, lm-eval and mergekit as the oracle."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cma
import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml

from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from search.cli import main
from search.results.export import export_recipe
from search.results.summary import read_summary
from search.run_dir import RunDir
from search.runner import run_search

EVOMERGE = Path(sys.executable).parent / "evomerge"


def write_config(path: Path, family, **overrides) -> Path:
    skills = list(family.children)
    config = {
        "models": {"base": str(family.base), "fine_tunes": [str(family.children[s]) for s in skills]},
        "merge": {"method": "ties"},
        "objectives": [{"task": "toy_search", "metric": "acc"}],
        "held_out": {"tasks": [{"task": family.test_tasks[s], "metric": "acc"} for s in skills], "limit": 60},
        "fitness": {"limit": 40},
        "evaluation": {"include_path": str(family.tasks_dir), "batch_size": 128},
        "optimizer": {"name": "cmaes", "popsize": 4},
        "budget": {"trials": 6},
        # Tuning the reference families costs 34 search-split evaluations, most of a test search's time: only the
        # tests of those references ask for them.
        "baselines": {"tuned": []},
        "execution": {"workers": 1, "trial_timeout": 300},
        "output_dir": str(path.parent / "run"),
        "seed": 3,
    }
    for key, value in overrides.items():
        config[key] = value if not isinstance(value, dict) else {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config))
    return path


def study_states(run_dir: Path) -> dict[int, str]:
    with sqlite3.connect(run_dir / "optuna.db") as db:
        return dict(db.execute("select number, state from trials"))


def trial_items(run_dir: Path) -> dict[int, int]:
    """The items user attr (a trial's cost) of every trial that has one, read from optuna.db with plain sqlite."""
    with sqlite3.connect(run_dir / "optuna.db") as db:
        rows = db.execute(
            "select t.number, a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
            "where a.key = 'items'"
        )
        return {number: json.loads(value) for number, value in rows}


@pytest.fixture(scope="module")
def cmaes_run(toy_family, tmp_path_factory):
    # Coarse to fine: TIES' four one-knob densities (at the middle weight: TIES normalizes it away), then both
    # default recipes, are the first six trials; the seventh is CMA-ES's, around the best of them.
    directory = tmp_path_factory.mktemp("cmaes")
    tuned = {"tuned": ["task_arithmetic", "ties", "dare_ties"]}
    config = write_config(
        directory / "search.yml", toy_family, optimizer={"coarse_to_fine": True}, baselines=tuned, budget={"trials": 7}
    )
    summary = run_search(config)
    return config, summary


def test_cmaes_search_completes_and_reports(cmaes_run):
    config, summary = cmaes_run
    run_dir = config.parent / "run"
    assert summary.trials.complete + summary.trials.failed == 7
    assert list(study_states(run_dir).values()).count("COMPLETE") == summary.trials.complete >= 5
    assert summary.best is not None and summary.best.search["toy_search"] >= max(
        m.search["toy_search"] for m in summary.front
    )
    names = {p.name for p in summary.parents} | {b.name for b in summary.baselines}
    assert {"base", "srt", "rev", "cae", "ties d=0.5 w=1", "task arithmetic λ=1"} <= names
    assert any(name.startswith("task arithmetic λ=") and "tuned" in name for name in names)
    assert any(name.startswith("ties d=") and "tuned" in name for name in names)
    assert any(name.startswith("dare-ties d=") and "tuned" in name for name in names)
    for entry in [*summary.parents, *summary.baselines]:
        assert 0.0 <= entry.heldout["average"] <= 1.0
    assert summary.best.vs_parent is not None and summary.best.vs_parent.low <= summary.best.vs_parent.high
    # best.yml holds what the gate chose: the evolved winner if it beat the references on the search split
    gate, best = summary.gate, (run_dir / "best.yml").read_text()
    references = {entry.name: entry.recipe for entry in [*summary.parents, *summary.baselines]}
    evolved = (run_dir / summary.best.recipe).read_text()
    assert (gate.chosen == f"evolved #{summary.best.trial}") if gate.passed else (gate.chosen in references)
    assert Recipe.from_yaml(best) == Recipe.from_yaml(evolved if gate.passed else references[gate.chosen])
    assert best.startswith("# evolved by evomerge" if gate.passed else f"# not evolved: {gate.chosen}, because")
    report = (run_dir / "report.md").read_text()
    assert "task arithmetic λ=1" in report and f"evolved #{summary.best.trial}" in report
    assert "best parent per task" in report and f"gate {'passed' if gate.passed else 'failed'}: " in report

    tracking = json.loads((run_dir / "tracking.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracking["parent_run_id"]]
    assert len(children) == 7
    assert all("toy_search" in r.data.metrics or r.data.tags["evomerge.status"] == "failed" for r in children)


def test_the_coarse_stage_comes_first_and_cmaes_starts_from_its_best(cmaes_run):
    config, _ = cmaes_run
    run_dir = config.parent / "run"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.user_attrs["cma_kind"] for t in trials] == ["coarse"] * 6 + ["sampled"]
    densities = [{v for k, v in t.params.items() if k.startswith("density")} for t in trials[:6]]
    weights = [{v for k, v in t.params.items() if k.startswith("weight")} for t in trials[:6]]
    assert densities == [{0.3}, {0.5}, {0.7}, {0.9}, {0.5}, {1.0}] and weights == [{0.5}] * 4 + [{1.0}, {1 / 3}]
    best = max(trials[:6], key=lambda t: t.values[0])
    state = json.loads((run_dir / "search.cmaes.json").read_text())
    lower = [0.1 if name.startswith("density") else 0.0 for name in state["genes"]]  # the default bounds
    unit = [(best.params[name] - low) / (1.0 - low) for name, low in zip(state["genes"], lower, strict=True)]
    mean = cma.boundary_handler.BoundTransform([0, 1]).transform(np.array(state["strategy"]["mean"]))
    np.testing.assert_allclose(mean, unit, atol=1e-12)  # pycma's mean, as a genome in [0, 1]^d


def test_export_reproduces_the_scored_candidate_with_mergekit(cmaes_run, tmp_path):
    config, summary = cmaes_run
    run_dir = config.parent / "run"
    out_file = tmp_path / "best.yml"
    assert main(["export", str(run_dir), "--evolved", "--out", str(out_file)]) == 0
    assert out_file.read_text() == export_recipe(run_dir, evolved=True)
    scored = Recipe.from_yaml(run_dir / summary.best.recipe)
    assert Recipe.from_yaml(out_file) == scored
    merged_dir = tmp_path / "merged"
    subprocess.run(
        [Path(sys.executable).parent / "mergekit-yaml", out_file, merged_dir, "--random-seed", "3"],
        check=True,
        capture_output=True,
    )
    from safetensors.torch import load_file

    theirs = load_file(merged_dir / "model.safetensors")
    ours = MergeSession(scored.model_refs()).materialize(scored, seed=3)
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)


def test_export_rank_and_objective_choices(cmaes_run):
    config, summary = cmaes_run
    run_dir = config.parent / "run"
    # The oracle is the study itself: the complete trial with the highest value (ties: the first) is the best.
    with sqlite3.connect(run_dir / "optuna.db") as db:
        (best,) = db.execute(
            "select t.number from trials t join trial_values v on v.trial_id = t.trial_id "
            "where t.state = 'COMPLETE' order by v.value desc, t.number limit 1"
        ).fetchone()
    best_recipe = Recipe.from_yaml((run_dir / "recipes" / f"trial-{best}.yml").read_text())
    assert export_recipe(run_dir) == (run_dir / "best.yml").read_text()  # the gate's choice, whichever it was
    for exported in (
        export_recipe(run_dir, evolved=True),
        export_recipe(run_dir, rank=1),
        export_recipe(run_dir, objective="toy_search"),
    ):
        assert Recipe.from_yaml(exported) == best_recipe
    with pytest.raises(InputError, match=r"run: --rank: expected 1 to \d+ \(the front's size\), got"):
        export_recipe(run_dir, rank=len(summary.front) + 1)
    with pytest.raises(InputError, match=r"run: --objective: expected one of \['toy_search'\], got 'nope'"):
        export_recipe(run_dir, objective="nope")


@pytest.mark.parametrize(
    ("optimizer", "objectives"),
    [("nsga2", "per_skill"), ("tpe", "group"), ("random", "group")],
)
def test_other_optimizers(optimizer, objectives, toy_family, tmp_path):
    tasks = (
        [{"task": t, "metric": "acc"} for t in toy_family.search_tasks.values()]
        if objectives == "per_skill"
        else [{"task": "toy_search", "metric": "acc"}]
    )
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        objectives=tasks,
        optimizer={"name": optimizer, "popsize": 4},
        budget={"trials": 5},
        held_out={"tasks": [{"task": toy_family.test_tasks["srt"], "metric": "acc"}], "limit": 30},
        baselines={"tuned": ["task_arithmetic"]},
    )
    summary = run_search(config)
    assert summary.trials.complete == 5
    assert summary.front and all(len(m.search) == len(tasks) for m in summary.front)
    tuned = [b.name for b in summary.baselines if b.name.endswith("(tuned on search)")]
    assert len(tuned) == 1 and tuned[0].startswith("task arithmetic λ=")  # only the family asked for


def test_failing_candidates_are_recorded_and_the_search_goes_on(toy_family, tmp_path):
    """DELLA needs density ± epsilon inside (0, 1): most densities in [0.02, 0.98] break it, defaults do not."""
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        merge={"method": "della", "parameters": {"epsilon": 0.1}},
        genome={"bounds": {"density": [0.02, 0.98]}},
        optimizer={"name": "random"},
        budget={"trials": 6},
    )
    summary = run_search(config)
    run_dir = tmp_path / "run"
    states = study_states(run_dir)
    assert summary.trials.failed >= 1 and summary.trials.complete >= 1
    assert list(states.values()).count("FAIL") == summary.trials.failed
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    failed = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`evomerge.status` = 'failed'", output_format="list"
    )
    assert failed and all("density" in r.data.tags["evomerge.error"] for r in failed)


def test_resume_after_sigkill_loses_and_repeats_nothing(toy_family, tmp_path):
    config = write_config(tmp_path / "search.yml", toy_family, optimizer={"name": "random"}, budget={"trials": 8})
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(
        [EVOMERGE, "run", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (run_dir / "optuna.db").exists() and list(study_states(run_dir).values()).count("COMPLETE") >= 3:
            break
        assert first.poll() is None, first.stdout.read().decode()
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and every Ray process it started, as a crash would
    first.wait()
    before = {n: s for n, s in study_states(run_dir).items() if s == "COMPLETE"}
    assert len(before) >= 3
    parent = json.loads((run_dir / "tracking.json").read_text())["parent_run_id"]

    result = subprocess.run([EVOMERGE, "run", config, "--resume"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    after = study_states(run_dir)
    assert all(after[n] == "COMPLETE" for n in before)  # nothing finished was lost
    summary = read_summary(RunDir.open(run_dir))
    assert summary.trials.complete + summary.trials.failed == 8  # the budget counts the first session's trials
    items = trial_items(run_dir)
    assert all(items[n] == 40 * len(toy_family.children) for n in before)  # the first session's costs were kept
    assert summary.trials.items == sum(items.values())  # every finished trial's cost, from both sessions
    assert json.loads((run_dir / "tracking.json").read_text())["parent_run_id"] == parent
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    trial_tags = [r.data.tags["evomerge.trial"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(trial_tags) == len(set(trial_tags))  # no trial logged twice


def test_resume_logs_a_finished_trial_mlflow_never_saw(cmaes_run):
    """A kill between the study's record of a trial and its MLflow child run: resuming logs it from the study."""
    config, _ = cmaes_run
    run_dir = config.parent / "run"
    state = json.loads((run_dir / "tracking.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    lost = next(r for r in client.search_runs([state["experiment_id"]]) if r.data.tags.get("evomerge.trial") == "1")
    client.delete_run(lost.info.run_id)  # as if the kill came before it was created

    assert main(["run", str(config), "--resume"]) == 0
    runs = client.search_runs([state["experiment_id"]], "tags.`evomerge.trial` = '1'")
    with sqlite3.connect(run_dir / "optuna.db") as db:
        (value,) = db.execute(
            "select v.value from trials t join trial_values v on v.trial_id = t.trial_id where t.number = 1"
        ).fetchone()
    assert len(runs) == 1 and runs[0].info.run_id != lost.info.run_id
    assert runs[0].data.metrics["toy_search"] == value and runs[0].data.tags["evomerge.status"] == "complete"
    assert runs[0].data.metrics["items"] == trial_items(run_dir)[1]
