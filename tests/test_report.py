"""The held-out comparison on synthetic per-item scores, its text table, and summary.json."""

import json
import re

import numpy as np
import pytest

from merge_core.errors import InputError
from search.results.heldout import (
    AVERAGE,
    CEILING,
    HeldoutEntry,
    ceiling,
    ceiling_share,
    format_table,
    heldout_comparison,
    heldout_scores,
)
from search.results.statistics import paired_bootstrap
from search.results.summary import RunSummary, read_summary, write_summary
from search.run_dir import RunDir


def correct_on(count: int, total: int) -> np.ndarray:
    """0/1 item scores: the first `count` items right."""
    return (np.arange(total) < count).astype(float)


# Two tasks of different sizes (100 and 50 items), so the macro average differs from the item-weighted one.
ENTRIES = [
    HeldoutEntry("math-parent", "parent", {"arith": correct_on(80, 100), "copy": correct_on(10, 50)}),
    HeldoutEntry("copy-parent", "parent", {"arith": correct_on(20, 100), "copy": correct_on(45, 50)}),
    HeldoutEntry("linear", "baseline", {"arith": correct_on(50, 100), "copy": correct_on(30, 50)}),
    HeldoutEntry("trial-7", "evolved", {"arith": correct_on(85, 100), "copy": correct_on(40, 50)}),
]


@pytest.fixture(scope="module")
def rows():
    return heldout_comparison(ENTRIES, resamples=500, seed=3)


def row(rows, task, entry):
    return next(r for r in rows if r.task == task and r.entry == entry)


def test_rows_cover_every_task_and_entry_with_the_average_last(rows):
    assert [(r.task, r.entry) for r in rows] == [
        (task, entry.name) for task in ("arith", "copy", AVERAGE) for entry in ENTRIES
    ]
    assert row(rows, "arith", "trial-7").score == pytest.approx(0.85)
    assert row(rows, "copy", "linear").score == pytest.approx(0.6)
    assert row(rows, "copy", "linear").n == 50 and row(rows, AVERAGE, "linear").n == 150


def test_the_average_is_the_mean_of_the_task_scores(rows):
    # Macro: (0.85 + 0.80) / 2, not the item-weighted (85 + 40) / 150.
    assert row(rows, AVERAGE, "trial-7").score == pytest.approx(0.825)
    assert row(rows, AVERAGE, "copy-parent").score == pytest.approx((0.2 + 0.9) / 2)


def test_evolved_rows_compare_with_the_strongest_parent_and_baseline_on_that_row(rows):
    assert row(rows, "arith", "trial-7").best_parent == "math-parent"
    assert row(rows, "copy", "trial-7").best_parent == "copy-parent"
    average = row(rows, AVERAGE, "trial-7")
    assert average.best_parent == "copy-parent"  # 0.55 beats math-parent's 0.5
    assert average.best_baseline == "linear"
    assert average.vs_parent.mean_diff == pytest.approx(0.825 - 0.55)
    assert average.vs_baseline.mean_diff == pytest.approx(0.825 - 0.55)
    assert average.vs_parent.excludes_zero and average.vs_parent.n == 150
    # A task row's comparison is exactly the paired bootstrap of that task's own item vectors.
    arith = row(rows, "arith", "trial-7")
    assert arith.vs_parent == paired_bootstrap(
        ENTRIES[3].scores["arith"], ENTRIES[0].scores["arith"], resamples=500, seed=3
    )
    assert row(rows, "copy", "trial-7").vs_parent.mean_diff == pytest.approx(-0.1)


def test_parents_and_baselines_carry_no_comparison(rows):
    for r in rows:
        if r.kind != "evolved":
            assert r.vs_parent is None and r.vs_baseline is None and r.best_parent is None


def test_without_baselines_the_baseline_comparison_is_absent():
    rows = heldout_comparison([ENTRIES[0], ENTRIES[3]], resamples=100)
    evolved = row(rows, AVERAGE, "trial-7")
    assert evolved.best_baseline is None and evolved.vs_baseline is None and evolved.vs_parent is not None


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "no entries"),
        ([ENTRIES[0], ENTRIES[0]], "unique"),
        (
            [ENTRIES[0], HeldoutEntry("x", "evolved", {"arith": correct_on(1, 99), "copy": correct_on(1, 50)})],
            r"'x'.*'arith'.*100",
        ),
        ([ENTRIES[0], HeldoutEntry("x", "evolved", {"arith": correct_on(1, 100)})], r"'x'.*tasks"),
        ([HeldoutEntry("x", "teacher", {"arith": [1.0]})], r"'x'.*kind"),
    ],
)
def test_unpaired_entries_are_refused_with_a_clear_message(entries, message):
    with pytest.raises(ValueError, match=message):
        heldout_comparison(entries)


def test_format_table_lines_up_columns_and_shows_the_intervals(rows):
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "entry", "kind", "score", "n", "vs", "best", "parent", "vs", "best", "baseline"]
    evolved_line = next(line for line in lines if line.startswith(AVERAGE) and "trial-7" in line)
    # By hand: trial-7's macro average is (0.85 + 0.80) / 2 = 0.825; the strongest parent on the average is
    # copy-parent at (0.20 + 0.90) / 2 = 0.55, so the difference is +0.275, its interval around it, above 0.
    match = re.search(r"\+0\.275 \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\] copy-parent \*", evolved_line)
    assert match, evolved_line
    assert 0 < float(match[1]) < 0.275 < float(match[2])
    assert evolved_line.split()[3] == "0.825"
    # Columns line up: every row's score starts where the header's "score" does.
    column = lines[0].index("score")
    assert all(line[column - 2 : column] == "  " and line[column].isdigit() for line in lines[1:13] if line)
    assert "95% paired bootstrap" in lines[-1]


SUMMARY = {
    "parents": [{"name": "math-parent", "heldout": {"arith": 0.8, "copy": 0.2, AVERAGE: 0.5}}],
    "baselines": [{"name": "linear", "heldout": {"arith": 0.5, "copy": 0.6, AVERAGE: 0.55}}],
    "front": [
        {"trial": 7, "recipe": "front/trial-7.yaml", "search": {"arith": 0.9}, "heldout": {AVERAGE: 0.8}, "items": 300}
    ],
    "best": {
        "trial": 7,
        "recipe": "front/trial-7.yaml",
        "search": {"arith": 0.9},
        "heldout": {AVERAGE: 0.8},
        "items": 300,
        "chosen_by": "highest mean search score",
        "best_parent": "math-parent",
        "vs_parent": {"mean_diff": 0.3, "low": 0.2, "high": 0.4, "n": 150, "confidence": 0.95},
    },
    "trials": {"complete": 40, "stopped": 3, "failed": 2, "items": 12300, "final_items": 4500},
    "wall_s": 123.5,
}


def test_summary_round_trips_through_summary_json(tmp_path):
    run = RunDir.create(tmp_path / "run", "search.yml")
    write_summary(run, RunSummary.model_validate(SUMMARY))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["trials"] == SUMMARY["trials"]
    summary = read_summary(run)
    assert summary == RunSummary.model_validate(SUMMARY)
    assert summary.best.vs_parent.excludes_zero and summary.best.vs_baseline is None
    # the temporary file was renamed, not left beside the results
    assert sorted(p.name for p in run.path.iterdir()) == ["evomerge-run.json", "recipes", "summary.json"]


def test_summary_scores_come_straight_from_the_rows(rows):
    scores = heldout_scores(rows)
    assert scores["linear"] == pytest.approx({"arith": 0.5, "copy": 0.6, AVERAGE: 0.55})


def test_a_bad_summary_is_one_line_naming_the_file_and_field(tmp_path):
    run = RunDir.create(tmp_path / "run", "search.yml")
    run.summary.write_text(json.dumps({**SUMMARY, "trials": {**SUMMARY["trials"], "failed": "many"}}))
    with pytest.raises(InputError, match=r"summary\.json: trials\.failed: expected an integer, got 'many'$"):
        read_summary(run)
    run.summary.write_text("{not json")
    with pytest.raises(InputError, match=r"summary\.json: <top level>: .*JSON"):
        read_summary(run)


def test_the_ceiling_is_each_tasks_best_parent_and_no_evolved_row_is_compared_with_it():
    top = ceiling(ENTRIES)
    assert top.name == CEILING and top.kind == "ceiling"
    # By hand: math-parent is best on arith (0.80 vs 0.20), copy-parent on copy (0.90 vs 0.20).
    assert list(top.scores) == ["arith", "copy"]
    assert top.scores["arith"] is ENTRIES[0].scores["arith"] and top.scores["copy"] is ENTRIES[1].scores["copy"]
    rows = heldout_comparison([*ENTRIES, top], resamples=100)
    assert row(rows, AVERAGE, CEILING).score == pytest.approx((0.8 + 0.9) / 2)
    assert row(rows, AVERAGE, CEILING).n == 150  # concatenated like every other average row
    assert row(rows, "copy", CEILING).vs_parent is None
    evolved = row(rows, AVERAGE, "trial-7")
    assert evolved.best_parent == "copy-parent" and evolved.vs_parent.mean_diff == pytest.approx(0.825 - 0.55)
    # (0.825 - 0.55) / (0.85 - 0.55): trial-7 closes 11/12 of the gap from the best parent to the ceiling.
    assert ceiling_share(rows, "trial-7") == pytest.approx(0.275 / 0.3)
    assert "best parent per task = the ceiling" in format_table(rows).splitlines()[-1]


def test_no_ceiling_on_one_task_and_no_share_without_a_gap():
    one_task = [HeldoutEntry(e.name, e.kind, {"arith": e.scores["arith"]}) for e in ENTRIES]
    assert ceiling(one_task) is None
    assert ceiling_share(heldout_comparison(one_task, resamples=100), "trial-7") is None
    # math-parent best on both tasks: the ceiling is math-parent itself, so there is no gap to share.
    dominant = [ENTRIES[0], HeldoutEntry("weak", "parent", {"arith": correct_on(1, 100), "copy": correct_on(1, 50)})]
    entries = [*dominant, ENTRIES[3]]
    rows = heldout_comparison([*entries, ceiling(entries)], resamples=100)
    assert row(rows, AVERAGE, CEILING).score == pytest.approx(row(rows, AVERAGE, "math-parent").score)
    assert ceiling_share(rows, "trial-7") is None
