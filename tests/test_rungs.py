"""Multi-fidelity fitness: the rung rule, nested item parts, the score cache, and a search with rungs end to end."""

import json
import sqlite3

import mlflow
import numpy as np
import pytest
from test_search_e2e import study_states, trial_items, write_config

from evaluators import Evaluator, TaskSpec
from merge_core.errors import InputError
from search.cli import main
from search.config import SearchConfig
from search.execution.worker import SEARCH, JobResult
from search.fitness.rungs import Rungs
from search.fitness.score_cache import ScoreCache, combine, recipe_key
from search.plan import plan_search
from search.results.summary import read_summary
from search.run_dir import RunDir
from search.runner import run_search


def test_a_candidate_goes_on_only_within_the_best_share_of_its_rung():
    rungs = Rungs((10, 30, 90), promote=1 / 3)
    assert rungs.goes_on(0, 0.5, [])  # the first of a rung is its best
    assert not rungs.goes_on(0, 0.4, [0.5])  # of two, only the best goes on
    assert not rungs.goes_on(0, 0.5, [0.5, 0.1])  # a tie ranks below the one that scored it first
    assert not rungs.goes_on(0, 0.0, [0.0] * 8)  # so a flat stretch pays full price once
    assert rungs.goes_on(1, 0.7, [0.1, 0.2, 0.3, 0.4, 0.9])  # 6 at the rung: the best 2 go on
    assert not rungs.goes_on(1, 0.35, [0.1, 0.2, 0.3, 0.4, 0.9])
    assert not rungs.goes_on(2, 1.0, [])  # the last rung is the end
    assert rungs.expected_items() == pytest.approx(10 + 20 / 3 + 60 / 9)


def test_rungs_must_increase_and_end_at_the_fitness_limit(toy_family, tmp_path):
    for fitness, problem in [
        ({"rungs": [20, 10]}, r"fitness\.rungs: expected two or more increasing item counts from 1 up, got \[20, 10\]"),
        ({"rungs": [10]}, r"fitness\.rungs: expected two or more increasing"),
        (
            {"rungs": [10, 20], "limit": 40},
            r"fitness\.rungs: expected the last rung to be fitness\.limit \(40\), got 20",
        ),
    ]:
        config = write_config(tmp_path / "search.yml", toy_family, fitness=fitness)
        with pytest.raises(InputError, match=problem):
            SearchConfig.from_yaml(config)


def scored_items(lm, task: str, **spec) -> tuple[list, list]:
    model, config = lm
    score = Evaluator(config, [TaskSpec(task=task, **spec)]).evaluate(model)[task]
    return score.item_ids, score.per_item


def test_rung_parts_tile_the_fitness_items_and_small_rungs_are_prefixes(lm):
    task = "toy_rev_search"
    fitness, per_item = scored_items(lm, task, limit=60)
    first, _ = scored_items(lm, task, limit=60, part=(0, 10))
    second, _ = scored_items(lm, task, limit=60, part=(10, 30))
    third, _ = scored_items(lm, task, limit=60, part=(30, 60))
    assert (len(first), len(second), len(third)) == (10, 20, 30)
    assert sorted(first + second + third) == fitness  # disjoint, and together exactly the fitness items
    # The first rung's items do not depend on how far the later rungs go.
    assert scored_items(lm, task, limit=60, part=(0, 10))[0] == first
    by_item = dict(zip(fitness, per_item, strict=True))
    _, first_scores = scored_items(lm, task, limit=60, part=(0, 10))
    assert first_scores == [by_item[i] for i in first]  # the same item scores the same in a part
    with pytest.raises(InputError, match=r"part: expected start < stop <= the 60 items, got 50\.\.70"):
        scored_items(lm, task, limit=60, part=(50, 70))


def result(task_items: dict[str, list[float]], merge_s=1.0, eval_s=2.0) -> JobResult:
    scores = {task: float(np.mean(v)) for task, v in task_items.items()}
    return JobResult(scores, task_items, merge_s, eval_s)


def test_the_score_cache_keeps_parts_in_order_across_instances(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", "test")
    key = recipe_key("merge_method: linear\n", seed=3)
    assert key != recipe_key("merge_method: linear\n", seed=4)  # DARE's drops depend on the seed
    cache = ScoreCache(run_dir)
    assert cache.parts(key, SEARCH) == []
    first, second = result({"t": [1.0, 0.0]}), result({"t": [1.0, 1.0, 1.0, 0.0]})
    cache.add(key, SEARCH, 0, first)
    with pytest.raises(ValueError, match="part 2 of search before part 1"):
        cache.add(key, SEARCH, 2, second)
    cache.add(key, SEARCH, 1, second)
    cache.add(key, SEARCH, 1, first)  # kept already: stays as it was
    reopened = ScoreCache(RunDir.open(run_dir.path))  # a resumed run's
    assert reopened.parts(key, SEARCH) == [first, second]
    assert reopened.parts(key, "heldout") == []

    # Two parts: scores are the means over all their items; the cached part costs nothing.
    both = combine([first, second], fresh=[False, True])
    assert both.scores == {"t": pytest.approx(4 / 6)} and both.per_item == {"t": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]}
    assert (both.items, both.merge_s, both.eval_s) == (4, 1.0, 2.0)
    assert combine([first], fresh=[False]).items == 0 and combine([first], fresh=[True]) == first

    run_dir.item_scores(key).write_text("{not json")
    assert ScoreCache(run_dir).parts(key, SEARCH) == []  # unreadable: a miss, scored again


def intermediate_values(run_dir) -> dict[int, dict[int, float]]:
    with sqlite3.connect(run_dir / "optuna.db") as db:
        rows = db.execute(
            "select t.number, v.step, v.intermediate_value from trials t "
            "join trial_intermediate_values v on v.trial_id = t.trial_id"
        )
        values: dict[int, dict[int, float]] = {}
        for number, step, value in rows:
            values.setdefault(number, {})[step] = value
        return values


def rung_fitness(run_dir) -> dict[int, list[float]]:
    with sqlite3.connect(run_dir / "optuna.db") as db:
        rows = db.execute(
            "select t.number, a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
            "where a.key = 'rung_fitness'"
        )
        return {number: json.loads(value) for number, value in rows}


@pytest.mark.parametrize("optimizer", ["cmaes", "tpe"])
def test_a_search_with_rungs_stops_most_candidates_early_and_resumes_from_the_cache(optimizer, toy_family, tmp_path):
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        fitness={"rungs": [8, 40]},
        optimizer={"name": optimizer, "popsize": 4},
        budget={"trials": 8},
    )
    summary = run_search(config)
    run_dir = tmp_path / "run"
    states, items, fitness = study_states(run_dir), trial_items(run_dir), rung_fitness(run_dir)
    tasks = len(toy_family.children)  # toy_search is a group of one task per skill
    assert len(states) == 8 and set(fitness) == set(states)
    # One worker: each candidate's rungs finish before the next is asked, so the decisions replay in order.
    rungs, seen = Rungs((8, 40), 1 / 3), [[], []]
    for number in sorted(states):
        went_on = rungs.goes_on(0, fitness[number][0], seen[0])
        seen[0].append(fitness[number][0])
        assert len(fitness[number]) == (2 if went_on else 1)
        assert states[number] == ("COMPLETE" if went_on else "PRUNED")
        assert items[number] == (40 if went_on else 8) * tasks  # a promoted one pays only the new 32 per task
        if not went_on:
            assert intermediate_values(run_dir)[number] == {8: fitness[number][0]}  # TPE ranks it by rung
    complete = [n for n, s in states.items() if s == "COMPLETE"]
    assert 1 <= len(complete) < 8 and summary.trials.complete == len(complete)
    assert (summary.trials.stopped, summary.trials.failed) == (8 - len(complete), 0)
    assert {m.trial for m in summary.front} <= set(complete)  # the front holds full-fidelity scores only
    assert summary.trials.items == sum(items.values())
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    stopped = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`evomerge.status` = 'stopped'", output_format="list"
    )
    assert len(stopped) == 8 - len(complete) and all(r.data.metrics["fidelity"] == 8 for r in stopped)

    # Resumed after it finished: every score the final comparison needs comes from the cache, none is re-scored.
    assert summary.trials.final_items > 0
    assert main(["run", str(config), "--resume"]) == 0
    assert trial_items(run_dir) == items and read_summary(RunDir.open(run_dir)).trials.final_items == 0


def test_rungs_past_a_tasks_size_are_refused_before_anything_starts(toy_family, tmp_path):
    config = write_config(tmp_path / "search.yml", toy_family, fitness={"rungs": [8, 500], "limit": 500})
    with pytest.raises(
        InputError, match=r"fitness\.rungs: expected rungs of at most the 200 items of 'toy_\w+', got 500"
    ):
        run_search(config)
    assert not (tmp_path / "run").exists()


def test_plan_prints_the_fidelity_schedule_and_the_expected_cost(toy_family, tmp_path):
    config = write_config(tmp_path / "search.yml", toy_family, fitness={"rungs": [8, 40]}, budget={"trials": 30})
    lines = {line.split()[0]: line for line in plan_search(config).splitlines()}
    assert "rungs of 8 → 40 items per task, the best 33% at each go on" in lines["fidelity"]
    assert "~19 items per task per candidate, against 40 without" in lines["fidelity"]  # 8 + 32/3
    tasks = len(toy_family.children)
    assert f"~{(8 + 32 / 3) * tasks:.0f} items per candidate (all {40 * tasks} at full fidelity)" in lines["cost"]
