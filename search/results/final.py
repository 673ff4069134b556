"""After the search: the front, every parent and the reference recipes scored on the held-out split.

The steps, in order (each a method, so a new report row or reference recipe has one obvious place):
1. tune             every family of config baselines.tuned over its grid, and the parents, on the SEARCH split
                    (ps+dfs: the stage-1 merge too, a reference the paths built on it must beat; moe: the plain MoE)
2. choose           the recommended evolved recipe: the front's best on the search split or, with a selection
                    split, the best there of the top_k by search fitness (select: one batch with the parents
                    and the tuned baselines, since the search items are the ones every optimizer step fitted)
3. gate             does it beat the best parent and the best tuned baseline on the split it was chosen on?
4. entries          parents, default and tuned baselines, the recommended recipe and the front, by name
5. score_heldout    all of them on the held-out items, per item (for paired statistics)
6. compare          the held-out rows with paired bootstrap CIs, and the ceiling row (each task's best parent)
7. summarize        summary.json's content
8. write            summary.json, report.md, best.yml (the gate's choice), heldout_items.json, and MLflow
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Protocol

from merge_core import Recipe
from merge_core.moe_config import read_candidate
from search.config import SearchConfig
from search.execution.worker import HELDOUT, SEARCH, SELECTION
from search.fitness import Objectives
from search.genome import trial_line
from search.results import baselines
from search.results.export import best_text
from search.results.front import Front
from search.results.heldout import (
    AVERAGE,
    CEILING,
    HeldoutEntry,
    HeldoutRow,
    aligned,
    ceiling,
    ceiling_share,
    format_table,
    heldout_comparison,
    heldout_scores,
)
from search.results.summary import BestModel, FrontMember, Gate, ModelScores, RunSummary, TrialCounts, write_summary
from search.results.tracking import Tracker
from search.run_dir import RunDir

STAGE1_REFERENCE = "stage-1 merge"  # ps+dfs's weight merge, among the tuned references
PLAIN_MOE_REFERENCE = "plain MoE"  # moe's config as given (every expert at its own scale), among them too


class Scored(Protocol):
    scores: dict[str, float]  # task -> metric value
    per_item: dict[str, list[float]]  # task -> per-item scores

    @property
    def items(self) -> int: ...  # items scored: the cost


# name -> recipe, split -> name -> scores (entries whose evaluation failed are left out)
Evaluate = Callable[[dict[str, Recipe], str], dict[str, Scored]]


@dataclass(frozen=True)
class Tuning:
    """What the search split says about the references, by entry name: mean fitness (Objectives.mean_fitness)."""

    parents: dict[str, float]
    tuned: dict[str, tuple[Recipe, float]]  # one per family: "<family> <knobs> (tuned on search)" -> its best point


@dataclass(frozen=True)
class Choice:
    """The split the recommended evolved recipe is chosen on and what the gate compares it with there: mean
    fitness (Objectives.mean_fitness) on that split, by trial number or entry name."""

    split: str  # SEARCH, or SELECTION when one is configured
    chosen_by: str  # summary.json's best.chosen_by
    candidates: dict[int, float]  # trial number -> mean fitness
    parents: dict[str, float]
    tuned: dict[str, float]  # Tuning.tuned's names
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # trial -> objective scores on SELECTION

    @property
    def winner(self) -> int | None:
        """The candidate of highest mean fitness (ties: the first); None without candidates."""
        return max(self.candidates, key=self.candidates.__getitem__, default=None)


class FinalComparison:
    def __init__(
        self,
        config: SearchConfig,
        run_dir: RunDir,
        objectives: Objectives,
        tracker: Tracker,
        evaluate: Evaluate,
        started: float,
        say: Callable[[str], None] = print,
    ):
        self.config, self.run_dir, self.objectives, self.tracker = config, run_dir, objectives, tracker
        self.evaluate, self.started, self.say = evaluate, started, say  # started: time.monotonic() of the search

    def run(
        self,
        front: Front,
        completed: dict[int, list[float]],
        trials_done: int,
        spent: Mapping[int, int],
        stopped: int = 0,
    ) -> RunSummary:
        """`spent`: the items each finished trial was scored on, by trial number; `stopped`: of the trials done,
        those fitness rungs stopped early (neither complete nor failed)."""
        costs: list[int] = []  # the items of every scoring below: what the final comparison costs on top
        self.evaluate = counting(self.evaluate, costs)
        tuning = self.tune()
        choice = self.choose(front, completed, tuning)
        gate = self.gate(choice)
        entries = self.entries(front, tuning, choice)
        results = self.score_heldout(entries)
        rows = self.compare(entries, results)
        counts = TrialCounts(
            complete=len(completed),
            stopped=stopped,
            failed=trials_done - len(completed) - stopped,
            items=sum(spent.values()),
            final_items=sum(costs),
        )
        summary = self.summarize(front, completed, counts, entries, rows, spent, gate, choice)
        self.write(summary, rows, choice)
        return summary

    def parents(self) -> dict[str, Recipe]:
        models = [self.config.models.base, *self.config.models.fine_tunes]
        return {Path(model).name or model: baselines.parent(model) for model in models}

    def stage1(self) -> dict[str, Recipe]:
        """What the genome builds on, by its reference name: ps+dfs's stage-1 merge as the run started with it,
        moe's mergekit-moe config as given; otherwise none."""
        if self.config.genome.kind == "moe":
            return {PLAIN_MOE_REFERENCE: self.config.genome.moe.moe}
        if self.config.genome.kind != "ps+dfs":
            return {}
        return {STAGE1_REFERENCE: Recipe.from_yaml(self.run_dir.read_text(self.run_dir.stage1))}

    def tune(self) -> Tuning:
        """One batch on the SEARCH split: every grid point of every tuned family, and the parents (the gate's
        references without a selection split). Each family keeps its grid point of highest mean fitness; failed
        points drop out."""
        base, children = self.config.models.base, list(self.config.models.fine_tunes)
        grids = [
            baselines.with_tokenizer(baselines.TUNED[name].candidates(base, children), self.config.merge, base)
            for name in self.config.baselines.tuned
        ]
        parents, stage1 = self.parents(), self.stage1()
        points = {name: recipe for grid in grids for name, recipe in grid.items()}
        fitness = self.fitness(self.evaluate(parents | stage1 | points, SEARCH))
        # ps+dfs: the weight merge its paths build on is the reference they have to beat; moe: the plain MoE
        tuned = {name: (recipe, fitness[name]) for name, recipe in stage1.items() if name in fitness}
        for grid in grids:
            scored = [name for name in grid if name in fitness]
            if scored:
                best = max(scored, key=fitness.__getitem__)  # ties: the first grid point
                tuned[best + baselines.TUNED_SUFFIX] = (grid[best], fitness[best])
        return Tuning({name: fitness[name] for name in parents if name in fitness}, tuned)

    def fitness(self, results: Mapping[str, Scored]) -> dict[str, float]:
        """Each entry's mean fitness; entries with a non-finite score drop out, as failed candidates do."""
        return {
            name: self.objectives.mean_fitness(values)
            for name, result in results.items()
            if (values := self.objectives.values(result.scores)) is not None
        }

    def choose(self, front: Front, completed: dict[int, list[float]], tuning: Tuning) -> Choice:
        """On the search split, the front's best; with a selection split, the best there of the top candidates
        (the best of many on the items they were all fitted to is biased upward: the winner's curse)."""
        searched = Choice(
            SEARCH,
            "highest mean search score on the front",
            {number: self.objectives.mean_fitness(completed[number]) for number in front.members},
            tuning.parents,
            {name: fit for name, (_, fit) in tuning.tuned.items()},
        )
        if self.config.selection is None or not front.members:
            return searched
        selected = self.select(front, completed, tuning)
        if selected.candidates:
            return selected
        self.say("no candidate could be scored on the selection split: choosing on the search split")
        return searched

    def select(self, front: Front, completed: dict[int, list[float]], tuning: Tuning) -> Choice:
        """One batch on the SELECTION split: the top_k trials by mean search fitness (front members first), the
        parents and each tuned family's chosen grid point; entries whose evaluation failed drop out."""
        top_k = self.config.selection.top_k
        others = [number for number in completed if number not in front.members]
        others.sort(key=lambda number: -self.objectives.mean_fitness(completed[number]))
        top = [*front.members, *others][:top_k]
        parents = self.parents()
        tuned = {name: recipe for name, (recipe, _) in tuning.tuned.items()}
        results = self.evaluate(
            {evolved(number): self.evolved_recipe(number) for number in top} | parents | tuned, SELECTION
        )
        fitness = self.fitness(results)
        scored = [number for number in top if evolved(number) in fitness]
        return Choice(
            SELECTION,
            f"highest mean selection score of the top {top_k} by search score",
            {number: fitness[evolved(number)] for number in scored},
            {name: fitness[name] for name in parents if name in fitness},
            {name: fitness[name] for name in tuned if name in fitness},
            {number: dict(results[evolved(number)].scores) for number in scored},
        )

    def gate(self, choice: Choice) -> Gate | None:
        """The recommended evolved recipe against the best parent and the best tuned baseline, on the split it was
        chosen on (held-out scores must stay out of every choice); it passes only by beating both."""
        if choice.winner is None:
            return None
        winner, score = evolved(choice.winner), choice.candidates[choice.winner]
        pools = {"best parent": choice.parents, "best tuned baseline": choice.tuned}
        references = {label: max(fits.items(), key=itemgetter(1)) for label, fits in pools.items() if fits}
        unbeaten = [label for label, (_, fit) in references.items() if score <= fit]

        def cite(labels: list[str]) -> str:
            return " and ".join(f"the {label} {references[label][0]} ({references[label][1]:.4f})" for label in labels)

        scored = f"{winner} (mean {choice.split} fitness {score:.4f})"
        if not unbeaten:
            beaten = cite(list(references)) or "no reference (none was scored)"
            return Gate(passed=True, reason=f"{scored} beats {beaten}", chosen=winner)
        return Gate(
            passed=False,
            reason=f"{scored} does not beat {cite(unbeaten)}",
            chosen=max(references.values(), key=itemgetter(1))[0],  # the stronger reference (ties: the parent)
        )

    def entries(self, front: Front, tuning: Tuning, choice: Choice) -> dict[str, tuple[str, Recipe]]:
        """name -> (kind, recipe): parents first, then default and tuned baselines, then the recommended evolved
        recipe and the rest of the front."""
        base, children = self.config.models.base, list(self.config.models.fine_tunes)
        entries = {name: ("parent", recipe) for name, recipe in self.parents().items()}
        defaults = baselines.with_tokenizer(baselines.default_baselines(base, children), self.config.merge, base)
        entries |= {name: ("baseline", recipe) for name, recipe in defaults.items()}
        entries |= {name: ("baseline", recipe) for name, (recipe, _) in tuning.tuned.items()}
        # A selection split may recommend a trial off the front: it is compared on held-out like the front.
        shown = [] if choice.winner is None else dict.fromkeys([choice.winner, *front.members])
        for number in shown:
            entries[evolved(number)] = ("evolved", self.evolved_recipe(number))
        return entries

    def evolved_recipe(self, number: int) -> Recipe:
        return read_candidate(self.run_dir.read_text(self.run_dir.trial_recipe(number)))

    def score_heldout(self, entries: dict[str, tuple[str, Recipe]]) -> dict[str, Scored]:
        if not self.config.held_out.tasks:
            return {}
        results = self.evaluate({name: recipe for name, (_, recipe) in entries.items()}, HELDOUT)
        # Per-item scores stay with the run, so any other pairing can be computed later (experiments do).
        self.run_dir.write_json(self.run_dir.heldout_items, {name: r.per_item for name, r in results.items()})
        return results

    def compare(self, entries: dict[str, tuple[str, Recipe]], results: dict[str, Scored]) -> list[HeldoutRow]:
        held = [
            HeldoutEntry(name, kind, results[name].per_item) for name, (kind, _) in entries.items() if name in results
        ]
        top = ceiling(held)
        if top is not None:  # beside the parents it is made of
            held.insert(sum(entry.kind == "parent" for entry in held), top)
        return heldout_comparison(held, seed=self.config.seed) if held else []

    def summarize(
        self,
        front: Front,
        completed: dict[int, list[float]],
        counts: TrialCounts,
        entries: dict[str, tuple[str, Recipe]],
        rows: list[HeldoutRow],
        spent: Mapping[int, int],
        gate: Gate | None,
        choice: Choice,
    ) -> RunSummary:
        scores = heldout_scores(rows)

        def member(n: int) -> FrontMember:
            return FrontMember(
                trial=n,
                recipe=self.run_dir.relative(self.run_dir.trial_recipe(n)),
                search=dict(zip(self.objectives.keys, completed[n], strict=True)),
                selection=choice.scores.get(n, {}),
                heldout=scores.get(evolved(n), {}),
                items=spent[n],
            )

        best = None
        if choice.winner is not None:
            name = evolved(choice.winner)
            row = next((r for r in rows if r.task == AVERAGE and r.entry == name), None)
            best = BestModel(
                **member(choice.winner).model_dump(),
                chosen_by=choice.chosen_by,
                best_parent=row.best_parent if row else None,
                vs_parent=row.vs_parent if row else None,
                best_baseline=row.best_baseline if row else None,
                vs_baseline=row.vs_baseline if row else None,
                ceiling_share=ceiling_share(rows, name),
            )

        def scored(kind: str) -> list[ModelScores]:
            return [
                ModelScores(name=n, heldout=scores.get(n, {}), recipe=recipe.to_yaml())
                for n, (k, recipe) in entries.items()
                if k == kind
            ]

        return RunSummary(
            parents=scored("parent"),
            baselines=scored("baseline"),
            front=[member(n) for n in front.members],
            best=best,
            ceiling=ModelScores(name=CEILING, heldout=scores[CEILING]) if CEILING in scores else None,
            gate=gate,
            trials=counts,
            wall_s=time.monotonic() - self.started,
        )

    def write(self, summary: RunSummary, rows: list[HeldoutRow], choice: Choice) -> None:
        run = self.run_dir
        if summary.best is not None:
            run.write_text(run.best, best_text(run, summary, self.config.seed))
            self.tracker.log_best(run.best)
        write_summary(run, summary)
        table = format_table(rows) if rows else "(no held-out tasks configured)"
        gate = summary.gate  # None exactly when there is no best to gate
        verdict = f"\n{gate_line(gate, run)}\n" if gate else ""
        splits = split_table(summary) if choice.split == SELECTION else None
        beside = f"\n# search, selection and held-out scores\n\n```\n{splits}\n```\n" if splits else ""
        run.write_text(run.report, f"# held-out comparison\n\n```\n{table}\n```\n{verdict}{beside}")
        paths = self.config.genome.kind != "ps"  # front.csv gets each member's layer path (moe: its experts)
        recipes = {m.trial: run.read_text(run.trial_recipe(m.trial)) for m in summary.front}
        self.tracker.log_front(
            [
                {
                    "trial": m.trial,
                    "recipe": recipes[m.trial],
                    **({"path": trial_line(self.config, recipes[m.trial])} if paths else {}),
                    **m.search,
                    **{f"{SELECTION}.{task}": value for task, value in m.selection.items()},
                    **{f"{HELDOUT}.{task}": value for task, value in m.heldout.items()},
                }
                for m in summary.front
            ],
            list(self.objectives.keys),
            list(self.objectives.directions),
        )
        for member in evolved_members(summary):
            self.tracker.log_trial_split(member.trial, HELDOUT, member.heldout)
        for number, scores in choice.scores.items():
            self.tracker.log_trial_split(number, SELECTION, scores)
        if rows:
            self.tracker.log_heldout(rows)
        if gate is not None:
            self.tracker.log_gate(gate.passed, gate.reason)
        self.say(table)
        if splits:
            self.say(splits)
        if gate is not None:
            self.say(gate_line(gate, run))


def counting(evaluate: Evaluate, costs: list[int]) -> Evaluate:
    """`evaluate`, appending to `costs` the items each call scored."""

    def counted(recipes: dict[str, Recipe], split: str) -> dict[str, Scored]:
        results = evaluate(recipes, split)
        costs.append(sum(result.items for result in results.values()))
        return results

    return counted


def gate_line(gate: Gate, run: RunDir) -> str:
    """The gate's verdict in one plain line, and what best.yml holds because of it."""
    if gate.passed:
        return f"gate passed: {gate.reason}; {run.best.name} is {gate.chosen}"
    return (
        f"gate failed: {gate.reason}; {run.best.name} is {gate.chosen} instead "
        f"(evomerge export {run.path} --evolved writes the evolved recipe)"
    )


def evolved_members(summary: RunSummary) -> list[FrontMember]:
    """The evolved entries the run reports: the recommended one first (a selection split may pick it off the
    front), then the rest of the front."""
    if summary.best is None:
        return []
    return [summary.best, *(member for member in summary.front if member.trial != summary.best.trial)]


def split_table(summary: RunSummary) -> str:
    """The evolved entries' scores on each split side by side: where search beats selection, the search score was
    fitted to its items."""
    members = evolved_members(summary)
    keys = list(summary.best.search)
    header = ["entry", *(f"{split} {key}" for key in keys for split in (SEARCH, SELECTION)), f"{HELDOUT} {AVERAGE}"]
    lines = [header]
    for member in members:
        label = evolved(member.trial) + (" (best)" if member is summary.best else "")
        cells = [score_cell(scores.get(key)) for key in keys for scores in (member.search, member.selection)]
        lines.append([label, *cells, score_cell(member.heldout.get(AVERAGE))])
    legend = (
        f"{SEARCH}: the fitness items every optimizer step saw; {SELECTION}: the next items of the same tasks, "
        "where the best was chosen; - = not scored there."
    )
    return "\n".join([*aligned(lines), "", legend])


def score_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evolved(number: int) -> str:
    """The name a front member goes by in the held-out table."""
    return f"evolved #{number}"
