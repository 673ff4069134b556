"""The held-out comparison that decides whether a search helped.

Every entry (parent model, default mergekit recipe, evolved recipe) is scored per item on the same held-out
items, so each evolved entry is compared with a reference by a paired bootstrap over those items.

Choices, stated once:
- The reference on each row is the strongest parent (and the strongest baseline) on THAT row's items: the
  specialist parent on its own task, the best generalist on the average. That is the strictest comparison,
  and because the reference is picked on held-out scores it can only make the evolved entry look worse.
- The "average" row is the macro average (mean of the task scores). Its per-item vector concatenates the
  tasks with each item weighted by N / (T * n_task), so the vector's mean is exactly the macro average and
  item i still means the same item for every entry: the bootstrap stays paired.
- Which evolved entry is "best" is the caller's choice, and it should be made on search or selection scores:
  choosing it on held-out scores would bias the very comparison this module reports.
- The ceiling row is each task's specialist: the parent best on that task, chosen on these held-out items (a
  ceiling is what is possible, not a fair competitor, so no evolved row is compared with it). On one task it
  is just the best parent, so it needs two or more.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, get_args

import numpy as np

from search.results.statistics import PairedDiff, paired_bootstrap

Kind = Literal["parent", "baseline", "evolved", "ceiling"]
AVERAGE = "average"
CEILING = "best parent per task"


@dataclass(frozen=True)
class HeldoutEntry:
    """One model's per-item held-out scores: task -> scores, items in the same order for every entry."""

    name: str
    kind: Kind
    scores: Mapping[str, Sequence[float] | np.ndarray]


@dataclass(frozen=True)
class HeldoutRow:
    """One entry on one task (or AVERAGE); evolved rows carry their paired comparisons."""

    task: str
    entry: str
    kind: Kind
    score: float
    n: int
    best_parent: str | None = None
    vs_parent: PairedDiff | None = None
    best_baseline: str | None = None
    vs_baseline: PairedDiff | None = None

    def as_record(self) -> dict[str, Any]:
        """A flat dict (one CSV line): the comparisons become diff/low/high columns."""
        record: dict[str, Any] = {"task": self.task, "entry": self.entry, "kind": self.kind, "score": self.score}
        record["n"] = self.n
        for label, reference, diff in (
            ("parent", self.best_parent, self.vs_parent),
            ("baseline", self.best_baseline, self.vs_baseline),
        ):
            record[f"best_{label}"] = reference
            record[f"diff_vs_{label}"] = diff.mean_diff if diff else None
            record[f"low_vs_{label}"] = diff.low if diff else None
            record[f"high_vs_{label}"] = diff.high if diff else None
        return record


def _per_item_scores(entries: Sequence[HeldoutEntry]) -> dict[str, dict[str, np.ndarray]]:
    """task -> entry -> item vector, after checking that every entry scored the same items; adds AVERAGE."""
    if not entries:
        raise ValueError("held-out comparison: no entries to compare")
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"held-out comparison: entry names must be unique, got {names}")
    tasks = list(entries[0].scores)
    if not tasks or AVERAGE in tasks:
        raise ValueError(
            f"held-out comparison: entry {names[0]!r}: expected >= 1 task, none named {AVERAGE!r}, got {tasks}"
        )
    by_task: dict[str, dict[str, np.ndarray]] = {task: {} for task in tasks}
    for entry in entries:
        if entry.kind not in get_args(Kind):
            raise ValueError(
                f"held-out comparison: entry {entry.name!r}: kind: expected one of {get_args(Kind)}, got {entry.kind!r}"
            )
        if sorted(entry.scores) != sorted(tasks):
            raise ValueError(
                f"held-out comparison: entry {entry.name!r}: expected tasks {sorted(tasks)}, got {sorted(entry.scores)}"
            )
        for task in tasks:
            items = np.asarray(entry.scores[task], dtype=np.float64)
            expected = len(by_task[task][names[0]]) if by_task[task] else None
            if items.ndim != 1 or items.size == 0 or (expected is not None and items.size != expected):
                raise ValueError(
                    f"held-out comparison: entry {entry.name!r}: task {task!r}: expected a 1-D vector of "
                    f"{expected or '>= 1'} per-item scores (paired comparison needs the same items), got shape {items.shape}"
                )
            by_task[task][entry.name] = items
    total = sum(len(by_task[task][names[0]]) for task in tasks)
    weights = {task: total / (len(tasks) * len(by_task[task][names[0]])) for task in tasks}
    by_task[AVERAGE] = {name: np.concatenate([by_task[t][name] * weights[t] for t in tasks]) for name in names}
    return by_task


def heldout_comparison(
    entries: Sequence[HeldoutEntry], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> list[HeldoutRow]:
    """Rows task by task (AVERAGE last), entries in the given order, evolved rows with paired bootstrap CIs."""
    kinds = {entry.name: entry.kind for entry in entries}
    bootstrap = partial(paired_bootstrap, resamples=resamples, confidence=confidence, seed=seed)
    rows = []
    for task, items in _per_item_scores(entries).items():
        means = {name: float(vector.mean()) for name, vector in items.items()}
        strongest = {
            kind: max((name for name in means if kinds[name] == kind), key=means.__getitem__, default=None)
            for kind in ("parent", "baseline")
        }  # ties go to the entry given first
        for name, vector in items.items():
            row = HeldoutRow(task=task, entry=name, kind=kinds[name], score=means[name], n=len(vector))
            if kinds[name] == "evolved":
                parent, baseline = strongest["parent"], strongest["baseline"]
                row = replace(
                    row,
                    best_parent=parent,
                    vs_parent=bootstrap(vector, items[parent]) if parent else None,
                    best_baseline=baseline,
                    vs_baseline=bootstrap(vector, items[baseline]) if baseline else None,
                )
            rows.append(row)
    return rows


def ceiling(entries: Sequence[HeldoutEntry]) -> HeldoutEntry | None:
    """Each task's best parent's item vector (ties: the parent given first); None below two tasks, or no parent."""
    parents = [entry for entry in entries if entry.kind == "parent"]
    tasks = list(parents[0].scores) if parents else []
    if len(tasks) < 2:
        return None
    best = {task: max(parents, key=lambda entry: float(np.mean(entry.scores[task]))) for task in tasks}
    return HeldoutEntry(CEILING, "ceiling", {task: best[task].scores[task] for task in tasks})


def ceiling_share(rows: Sequence[HeldoutRow], entry: str) -> float | None:
    """How much of the gap from the best parent to the ceiling `entry` closes, on AVERAGE: 1 = all of it,
    0 = none, below 0 = worse than the best parent. None without a ceiling, or when one parent is best on
    every task (no gap to close)."""
    average = {row.entry: row for row in rows if row.task == AVERAGE}
    top = average.get(CEILING)
    parent = max((row.score for row in average.values() if row.kind == "parent"), default=None)
    # The ceiling is made of parents' vectors: with no gap it equals the best parent up to float summation.
    if top is None or parent is None or entry not in average or abs(top.score - parent) < 1e-12:
        return None
    return (average[entry].score - parent) / (top.score - parent)


def heldout_scores(rows: Sequence[HeldoutRow]) -> dict[str, dict[str, float]]:
    """entry -> task -> held-out score (AVERAGE included), the shape summary.json stores."""
    scores: dict[str, dict[str, float]] = {}
    for row in rows:
        scores.setdefault(row.entry, {})[row.task] = row.score
    return scores


def _diff_cell(reference: str | None, diff: PairedDiff | None) -> str:
    if diff is None:
        return ""
    marker = " *" if diff.excludes_zero else ""
    return f"{diff.mean_diff:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {reference}{marker}"


def aligned(lines: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells (the first a header) as plain text, each column as wide as its widest cell; an empty row
    stays a blank line."""
    widths = [max(len(line[i]) for line in lines if line) for i in range(len(lines[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() if line else ""
        for line in lines
    ]


def format_table(rows: Sequence[HeldoutRow]) -> str:
    """A plain-text table for the terminal; a blank line between tasks and a legend under it."""
    header = ["task", "entry", "kind", "score", "n", "vs best parent", "vs best baseline"]
    lines, previous_task = [header], None
    for row in rows:
        if previous_task is not None and row.task != previous_task:
            lines.append([])
        previous_task = row.task
        lines.append(
            [
                row.task,
                row.entry,
                row.kind,
                f"{row.score:.3f}",
                str(row.n),
                _diff_cell(row.best_parent, row.vs_parent),
                _diff_cell(row.best_baseline, row.vs_baseline),
            ]
        )
    text = aligned(lines)
    diffs = [row.vs_parent or row.vs_baseline for row in rows if row.vs_parent or row.vs_baseline]
    if diffs:
        has_ceiling = any(row.kind == "ceiling" for row in rows)
        ceiling_note = (
            f"; {CEILING} = the ceiling, each task's best parent picked on these items" if has_ceiling else ""
        )
        text.append("")
        text.append(
            f"vs: evolved minus the strongest parent/baseline on that row [{diffs[0].confidence:.0%} paired bootstrap "
            f"CI over items]; * = the CI excludes 0; {AVERAGE} = mean of the task scores{ceiling_note}."
        )
    return "\n".join(text)
