"""After the search: the front, every parent and the reference recipes scored on the held-out split.

The steps, in order (each a method, so a new report row or reference recipe has one obvious place):
1. tune_lambda      task arithmetic's one knob, tuned on the SEARCH split: the baseline a genome must beat
2. entries          parents, default mergekit recipes, the tuned λ and the front, by name
3. score_heldout    all of them on the held-out items, per item (for paired statistics)
4. summarize        the held-out table with paired bootstrap CIs and summary.json's content
5. write            summary.json, report.md, best.yml, heldout_items.json, and the same to MLflow
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from merge_core import Recipe
from search.config import SearchConfig
from search.execution.worker import HELDOUT, SEARCH
from search.fitness import Objectives
from search.results import baselines
from search.results.export import export_text
from search.results.front import Front
from search.results.heldout import AVERAGE, HeldoutEntry, HeldoutRow, format_table, heldout_comparison, heldout_scores
from search.results.summary import BestModel, FrontMember, ModelScores, RunSummary, TrialCounts, write_summary
from search.results.tracking import Tracker
from search.run_dir import RunDir


class Scored(Protocol):
    scores: dict[str, float]  # task -> metric value
    per_item: dict[str, list[float]]  # task -> per-item scores


# name -> recipe, split -> name -> scores (entries whose evaluation failed are left out)
Evaluate = Callable[[dict[str, Recipe], str], dict[str, Scored]]


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

    def run(self, front: Front, completed: dict[int, list[float]], trials_done: int) -> RunSummary:
        lam = self.tune_lambda()
        entries = self.entries(front, lam)
        results = self.score_heldout(entries)
        rows = self.compare(entries, results)
        summary = self.summarize(front, completed, trials_done, entries, rows)
        self.write(summary, rows)
        return summary

    def tune_lambda(self) -> float:
        base, children = self.config.models.base, list(self.config.models.fine_tunes)
        grid = {f"λ={lam:g}": baselines.task_arithmetic(base, children, lam) for lam in baselines.LAMBDA_GRID}
        results = self.evaluate(grid, SEARCH)
        fitness = {
            name: self.objectives.mean_fitness([r.scores[k] for k in self.objectives.keys])
            for name, r in results.items()
        }
        return float(max(fitness, key=fitness.__getitem__).removeprefix("λ="))

    def entries(self, front: Front, lam: float) -> dict[str, tuple[str, Recipe]]:
        """name -> (kind, recipe): parents first, then baselines, then the front, best first."""
        base, children = self.config.models.base, list(self.config.models.fine_tunes)
        entries = {Path(model).name or model: ("parent", baselines.parent(model)) for model in [base, *children]}
        entries |= {name: ("baseline", recipe) for name, recipe in baselines.default_baselines(base, children).items()}
        entries[f"task arithmetic λ={lam:g} (tuned on search)"] = (
            "baseline",
            baselines.task_arithmetic(base, children, lam),
        )
        for number in front.members:
            entries[evolved(number)] = (
                "evolved",
                Recipe.from_yaml(self.run_dir.read_text(self.run_dir.trial_recipe(number))),
            )
        return entries

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
        return heldout_comparison(held, seed=self.config.seed) if held else []

    def summarize(
        self,
        front: Front,
        completed: dict[int, list[float]],
        trials_done: int,
        entries: dict[str, tuple[str, Recipe]],
        rows: list[HeldoutRow],
    ) -> RunSummary:
        scores = heldout_scores(rows)
        members = [
            FrontMember(
                trial=n,
                recipe=self.run_dir.relative(self.run_dir.trial_recipe(n)),
                search=dict(zip(self.objectives.keys, completed[n], strict=True)),
                heldout=scores.get(evolved(n), {}),
            )
            for n in front.members
        ]
        best = None
        if members:
            row = next((r for r in rows if r.task == AVERAGE and r.entry == evolved(members[0].trial)), None)
            best = BestModel(
                **members[0].model_dump(),
                chosen_by="highest mean search score on the front",
                best_parent=row.best_parent if row else None,
                vs_parent=row.vs_parent if row else None,
                best_baseline=row.best_baseline if row else None,
                vs_baseline=row.vs_baseline if row else None,
            )

        def scored(kind: str) -> list[ModelScores]:
            return [ModelScores(name=n, heldout=scores.get(n, {})) for n, (k, _) in entries.items() if k == kind]

        return RunSummary(
            parents=scored("parent"),
            baselines=scored("baseline"),
            front=members,
            best=best,
            trials=TrialCounts(complete=len(completed), failed=trials_done - len(completed)),
            wall_s=time.monotonic() - self.started,
        )

    def write(self, summary: RunSummary, rows: list[HeldoutRow]) -> None:
        run = self.run_dir
        if summary.best is not None:
            recipe = run.read_text(run.trial_recipe(summary.best.trial))
            run.write_text(run.best, export_text(recipe, self.config.seed))
            self.tracker.log_best(run.best)
        write_summary(run, summary)
        table = format_table(rows) if rows else "(no held-out tasks configured)"
        run.write_text(run.report, f"# held-out comparison\n\n```\n{table}\n```\n")
        self.tracker.log_front(
            [
                {
                    "trial": m.trial,
                    "recipe": run.read_text(run.trial_recipe(m.trial)),
                    **m.search,
                    **{f"heldout.{task}": value for task, value in m.heldout.items()},
                }
                for m in summary.front
            ],
            list(self.objectives.keys),
            list(self.objectives.directions),
        )
        for member in summary.front:
            self.tracker.log_trial_heldout(member.trial, member.heldout)
        if rows:
            self.tracker.log_heldout(rows)
        self.say(table)


def evolved(number: int) -> str:
    """The name a front member goes by in the held-out table."""
    return f"evolved #{number}"
