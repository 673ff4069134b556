"""The selection split: items of the objective tasks after the fitness items, where the winner and the gate are
decided, so the best of many candidates is not picked on the very items the optimizer fitted."""

import json
import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from test_final import BASE, CHILDREN, two_logged_trials
from test_search_e2e import write_config

from evaluators import Evaluator, TaskSpec
from merge_core import Recipe
from merge_core.errors import InputError
from search.config import SearchConfig
from search.execution.preflight import preflight
from search.execution.worker import HELDOUT, SEARCH, SELECTION, JobResult
from search.fitness import Objectives
from search.results import baselines
from search.results.export import export_recipe
from search.results.final import FinalComparison
from search.results.front import Front
from search.results.summary import Gate, read_summary
from search.runner import run_search

# What TaskSpec(task="toy_rev_search", limit=20) scored with subset seed 1234 before TaskSpec had an offset.
FITNESS_ITEMS_BEFORE = [3, 13, 14, 16, 17, 28, 32, 46, 52, 55, 67, 71, 89, 90, 93, 103, 124, 154, 155, 156]


def item_ids(lm, task: str, **limits) -> list:
    model, config = lm
    return Evaluator(config, [TaskSpec(task=task, **limits)]).evaluate(model)[task].item_ids


@pytest.mark.parametrize("limit", [20, 40])  # random.sample draws these two sizes of 200 by different algorithms
def test_selection_items_follow_the_fitness_items_which_stay_as_they_were(lm, limit):
    fitness = item_ids(lm, "toy_rev_search", limit=limit)
    selection = item_ids(lm, "toy_rev_search", limit=30, offset=limit)
    if limit == 20:
        assert fitness == FITNESS_ITEMS_BEFORE
    assert len(fitness) == limit and len(selection) == 30 and not set(fitness) & set(selection)
    assert selection == sorted(selection) and max(selection) < 200
    # The rest of the task after the fitness items: every other item, once.
    rest = item_ids(lm, "toy_rev_search", offset=limit)
    assert sorted(fitness + rest) == list(range(200)) and set(selection) <= set(rest)


def test_a_groups_members_each_get_disjoint_selection_items(lm):
    fitness = item_ids(lm, "toy_search", limit=20)
    selection = item_ids(lm, "toy_search", limit=20, offset=20)
    assert len(fitness) == len(selection) == 60 and not set(fitness) & set(selection)
    assert [i for i in fitness if i.startswith("toy_rev_search:")] == [
        f"toy_rev_search:{i}" for i in FITNESS_ITEMS_BEFORE
    ]


MINIMAL = {
    "models": {"base": "toy/base", "fine_tunes": ["toy/rev", "toy/srt"]},
    "merge": {"method": "ties"},
    "objectives": [{"task": "toy_search", "metric": "acc"}],
    "fitness": {"limit": 20},
}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"limit": 0}, "selection.limit: expected an integer >= 1, got 0"),
        ({"limit": 10, "top_k": 0}, "selection.top_k: expected an integer >= 1, got 0"),
        ({}, "selection.limit: expected a value, got nothing (this field is required)"),
        ({"limit": 10, "seed": 3}, "selection.seed: unknown key; expected one of: limit, top_k"),
    ],
)
def test_a_bad_selection_section_is_one_line(section, message):
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict({**MINIMAL, "selection": section}, where="search.yml")
    assert str(caught.value) == f"search.yml: {message}"


def test_selection_needs_a_fitness_limit_and_held_out_tasks_stay_other_tasks():
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict({**MINIMAL, "fitness": {}, "selection": {"limit": 10}}, where="search.yml")
    assert str(caught.value) == (
        "search.yml: fitness.limit: expected an item count with a selection section "
        "(its items follow the fitness ones), got none"
    )
    held_out = {"tasks": [{"task": "toy_search", "metric": "acc"}]}
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict({**MINIMAL, "selection": {"limit": 10}, "held_out": held_out}, where="search.yml")
    assert str(caught.value) == (
        "search.yml: held_out.tasks[0].task: expected a task the search never sees, got objective 'toy_search'"
    )


def family_config(toy_family, **sections) -> SearchConfig:
    data = {
        **MINIMAL,
        "models": {"base": str(toy_family.base), "fine_tunes": [str(toy_family.children[s]) for s in ("rev", "srt")]},
        "evaluation": {"include_path": str(toy_family.tasks_dir)},
        **sections,
    }
    return SearchConfig.from_dict(data, where="search.yml")


def test_preflight_refuses_tasks_too_small_and_held_out_tasks_inside_an_objective_group(toy_family):
    too_many = family_config(toy_family, fitness={"limit": 150}, selection={"limit": 60})
    with pytest.raises(InputError) as caught:
        preflight(too_many)
    assert str(caught.value) == (
        "search.yml: selection.limit: expected fitness.limit + selection.limit <= the 200 items of "
        "'toy_rev_search', got 150 + 60"
    )
    inside = family_config(
        toy_family, selection={"limit": 20}, held_out={"tasks": [{"task": "toy_srt_search", "metric": "acc"}]}
    )
    with pytest.raises(InputError) as caught:
        preflight(inside)
    assert str(caught.value) == (
        "search.yml: held_out.tasks[0].task: expected a task the search never sees, got 'toy_srt_search' "
        "('toy_srt_search' is in objective 'toy_search')"
    )
    assert preflight(family_config(toy_family, fitness={"limit": 150}, selection={"limit": 50})).num_layers > 0


# -- the final comparison on a fake evaluate --------------------------------------------------------------------
TIES = "ties d=0.5 λ=1 (tuned on search)"  # the TIES point the search scores below make the tuned one
SEARCH_SCORES = {"srt": 0.3, "ties d=0.5 λ=1": 0.6}  # on the search split trial 0 (0.8) would beat both
HELD_OUT_ITEMS = {"t_rev": [1.0, 0.0, 0.0, 1.0]}


def fake_evaluate(scores: dict[str, dict[str, float]], calls: list):
    """`scores[split][name]` on toy_search (0.1 when not named); held out: the same items for everyone."""

    def evaluate(recipes: dict[str, Recipe], split: str) -> dict[str, JobResult]:
        calls.append((split, list(recipes)))
        if split == HELDOUT:
            return {name: JobResult({"t_rev": 0.5}, HELD_OUT_ITEMS, 0.0, 0.0) for name in recipes}
        values = {name: scores[split].get(name, 0.1) for name in recipes}
        return {name: JobResult({"toy_search": values[name]}, {"toy_search": [0.0] * 5}, 0.0, 0.0) for name in recipes}

    return evaluate


@pytest.fixture
def final(tmp_path, tracking_uri, request):
    """A FinalComparison over two logged trials (search scores 0.8 and 0.7: only trial 0 is on the front)."""
    config = SearchConfig.from_dict(
        {
            **MINIMAL,
            "models": {"base": BASE, "fine_tunes": CHILDREN},
            "selection": {"limit": 20, "top_k": 2},
            "held_out": {"tasks": [{"task": "t_rev", "metric": "acc"}]},
            "tracking": {"mlflow_uri": tracking_uri, "experiment": request.node.name},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run, tracker = two_logged_trials(config, tracking_uri, request.node.name)
    calls: list = []

    def finish(selection_scores: dict[str, float]):
        evaluate = fake_evaluate({SEARCH: SEARCH_SCORES, SELECTION: selection_scores}, calls)
        step = FinalComparison(config, run, Objectives.of(config), tracker, evaluate, time.monotonic(), print)
        completed = {0: [0.8], 1: [0.7]}
        return step.run(Front.of(completed, step.objectives), completed, 2, dict.fromkeys(completed, 100))

    return run, tracker, finish, calls


def test_the_winner_is_chosen_on_selection_and_may_be_off_the_front(final):
    run, tracker, finish, calls = final
    summary = finish({"evolved #0": 0.4, "evolved #1": 0.65, "srt": 0.5, TIES: 0.55})
    # One selection batch: the top 2 by search fitness (the front first), the parents, each tuned family's point.
    assert [split for split, _ in calls] == [SEARCH, SELECTION, HELDOUT]
    assert calls[1][1] == [
        "evolved #0",
        "evolved #1",
        "base",
        "rev",
        "srt",
        "task arithmetic λ=0.1 (tuned on search)",
        TIES,
        "dare-ties d=0.3 w=0.5 (tuned on search)",
    ]
    reason = f"evolved #1 (mean selection fitness 0.6500) beats the best parent srt (0.5000) and the best tuned baseline {TIES} (0.5500)"
    assert summary.gate == Gate(passed=True, reason=reason, chosen="evolved #1")
    best = summary.best
    assert (best.trial, best.search, best.selection) == (1, {"toy_search": 0.7}, {"toy_search": 0.65})
    assert best.chosen_by == "highest mean selection score of the top 2 by search score" and best.heldout
    assert [(m.trial, m.selection) for m in summary.front] == [(0, {"toy_search": 0.4})]
    assert read_summary(run) == summary
    assert calls[2][1][-2:] == ["evolved #1", "evolved #0"]  # the recommended one is compared on held-out too
    assert summary.trials.final_items == 5 * (3 + 34) + 5 * 8 + 4 * 11  # tuning, selection, held-out batches
    trial_1 = Recipe.from_yaml(run.read_text(run.trial_recipe(1)))
    assert Recipe.from_yaml(run.best.read_text()) == trial_1 == Recipe.from_yaml(export_recipe(run.path, evolved=True))
    report = run.report.read_text()
    assert f"gate passed: {reason}" in report and "# search, selection and held-out scores" in report
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("entry"))
    assert header.split() == ["entry", "search", "toy_search", "selection", "toy_search", "heldout", "average"]
    assert next(line for line in lines if line.startswith("evolved #1 (best)")).split()[3:] == [
        "0.700",
        "0.650",
        "0.500",
    ]
    assert next(line for line in lines if line.startswith("evolved #0 ")).split()[2:] == ["0.800", "0.400", "0.500"]
    client = MlflowClient(tracker.tracking_uri)
    runs = {
        int(r.data.tags["evomerge.trial"]): r
        for r in client.search_runs([tracker.experiment_id])
        if r.data.tags.get("evomerge.trial")
    }
    assert runs[1].data.metrics["selection/toy_search"] == 0.65 and runs[0].data.metrics["selection/toy_search"] == 0.4
    assert runs[1].data.metrics["heldout/t_rev"] == 0.5


def test_the_gate_compares_on_selection_scores_not_search_scores(final):
    run, _, finish, _ = final
    summary = finish({"evolved #0": 0.6, "evolved #1": 0.5, "srt": 0.9, TIES: 0.55})
    reason = "evolved #0 (mean selection fitness 0.6000) does not beat the best parent srt (0.9000)"
    assert summary.gate == Gate(passed=False, reason=reason, chosen="srt")
    assert summary.best.trial == 0 and summary.best.selection == {"toy_search": 0.6}
    assert Recipe.from_yaml(run.best.read_text()) == baselines.parent("toy/srt")


def test_a_small_search_chooses_its_best_on_the_selection_split(toy_family, tmp_path):
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        fitness={"limit": 20},
        selection={"limit": 20, "top_k": 2},
        held_out={"limit": 20},
        budget={"trials": 4},
    )
    summary = run_search(config)
    run_dir = tmp_path / "run"
    best = json.loads((run_dir / "summary.json").read_text())["best"]
    assert set(best["selection"]) == {"toy_search"} and 0.0 <= best["selection"]["toy_search"] <= 1.0
    assert best["chosen_by"] == "highest mean selection score of the top 2 by search score"
    assert f"(mean selection fitness {np.mean(list(best['selection'].values())):.4f})" in summary.gate.reason
    report = (run_dir / "report.md").read_text()
    assert "# search, selection and held-out scores" in report and "mean selection fitness" in report
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    (child,) = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`evomerge.trial` = '{best['trial']}'", output_format="list"
    )
    assert child.data.metrics["selection/toy_search"] == best["selection"]["toy_search"]
