"""budget.item_evals: a budget in scored items, kept in the study so a resumed run counts what it spent."""

import json
import math
import re
from pathlib import Path

import pytest
from test_optimizers import ALL, open_optimizer, sphere
from test_search_e2e import trial_items, write_config

from merge_core.errors import InputError
from search.config import BudgetConfig, SearchConfig
from search.optimizers.base import ITEMS
from search.plan import binding_limit
from search.run_dir import RunDir
from search.runner import run_search

MINIMAL = {
    "models": {"base": "org/base", "fine_tunes": ["org/a", "org/b"]},
    "merge": {"method": "ties"},
    "objectives": [{"task": "t", "metric": "acc"}],
}


def budget(**limits) -> BudgetConfig:
    return SearchConfig.from_dict({**MINIMAL, "budget": limits}, where="search.yml").budget


def test_item_evals_alone_or_with_the_other_limits():
    assert (budget(trials=None, item_evals=200).item_evals, budget(trials=None, item_evals=200).trials) == (200, None)
    both = budget(trials=10, wall_time="2h", item_evals=5000)
    assert (both.trials, both.wall_time, both.item_evals) == (10, 7200.0, 5000)
    assert budget().item_evals is None  # the default: no item limit


@pytest.mark.parametrize(
    ("value", "got"), [(0, "0"), (-60, "-60"), ("200", "'200'"), (1.5, "1.5"), (True, "True"), ([200], "[200]")]
)
def test_bad_item_evals_is_one_line_naming_the_field(value, got):
    with pytest.raises(InputError) as caught:
        budget(trials=None, item_evals=value)
    assert str(caught.value) == f"search.yml: budget.item_evals: expected an integer >= 1, got {got}"


def test_no_limit_at_all_names_item_evals_too():
    with pytest.raises(InputError) as caught:
        budget(trials=None, wall_time=None, item_evals=None)
    assert str(caught.value) == "search.yml: budget.trials: expected a trial count, a wall_time or item_evals, got none"


@pytest.mark.parametrize("name", ALL)
def test_spent_items_are_read_back_from_the_study_after_a_kill(tmp_path: Path, name: str):
    optimizer = open_optimizer(tmp_path, name)
    told = {}
    for index in range(5):
        trial = optimizer.ask()
        told[trial.number] = 10 * (index + 1)
        failed = index == 2  # a failed candidate whose scores came back was paid for too
        optimizer.tell(trial.number, None if failed else [sphere(trial.x)], {ITEMS: told[trial.number]})
    running = optimizer.ask()  # in flight when the process dies: it has spent nothing the study knows of
    assert optimizer.spent == told
    del optimizer

    resumed = open_optimizer(tmp_path, name, resume=True)
    assert resumed.spent == {**told, running.number: 0}  # the interrupted trial is FAIL now, with no items
    again = resumed.ask()
    resumed.tell(again.number, [sphere(again.x)], {ITEMS: 7})
    assert sum(resumed.spent.values()) == sum(told.values()) + 7


def test_plan_names_the_limit_that_binds():
    items_each, seconds_each = 60, 2.0
    assert binding_limit(budget(trials=None, item_evals=200), seconds_each, items_each) == ("item_evals", 4)
    assert binding_limit(budget(trials=3, item_evals=200), seconds_each, items_each) == ("trials", 3)
    assert binding_limit(budget(trials=100, wall_time=10, item_evals=600), seconds_each, items_each) == (
        "wall_time",
        5.0,
    )
    assert binding_limit(budget(trials=100, item_evals=240), seconds_each, items_each) == ("item_evals", 4)


def test_search_stops_when_the_items_spent_reach_the_budget(toy_family, tmp_path):
    per_candidate = 20 * len(toy_family.children)  # fitness.limit items of each task in the toy_search group
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        fitness={"limit": 20},
        optimizer={"name": "random"},
        budget={"trials": None, "item_evals": 200},
        held_out={"tasks": [{"task": toy_family.test_tasks["srt"], "metric": "acc"}], "limit": 10},
    )
    lines: list[str] = []
    summary = run_search(config, say=lines.append)
    run_dir = tmp_path / "run"
    trials = math.ceil(200 / per_candidate)  # one worker: the candidate that crosses 200 is the last one asked
    assert (summary.trials.complete, summary.trials.failed) == (trials, 0)
    assert trial_items(run_dir) == dict.fromkeys(range(trials), per_candidate)
    assert summary.trials.items == trials * per_candidate == 240
    assert summary.front and all(member.items == per_candidate for member in summary.front)
    assert summary.best.items == per_candidate
    # The final comparison's cost: every reference scored on the search split (as many as its progress line
    # announces, none failing), then every compared entry on the held-out task's 10 items.
    assert not [line for line in lines if "evaluation failed" in line]
    [search_split] = [
        int(m[1]) for line in lines if (m := re.fullmatch(r"scoring on the search split \((\d+) entries\)", line))
    ]
    heldout = json.loads(RunDir(run_dir).heldout_items.read_text())
    assert all(len(scores) == 10 for entry in heldout.values() for scores in entry.values())
    assert summary.trials.final_items == search_split * per_candidate + 10 * len(heldout)
