"""RUN_DIR/summary.json: what a finished search found, as validated data that export and reviewers read."""

from pydantic import BaseModel, ConfigDict, ValidationError

from merge_core.errors import from_validation
from search.results.statistics import PairedDiff
from search.run_dir import RunDir


class ModelScores(BaseModel):
    """A parent, a baseline or the ceiling: held-out score per task, AVERAGE included."""

    model_config = ConfigDict(extra="forbid")
    name: str
    heldout: dict[str, float]
    recipe: str | None = None  # mergekit YAML, so export can write it when the gate chose it (the ceiling has none)


class FrontMember(BaseModel):
    """An evolved recipe on the final Pareto front."""

    model_config = ConfigDict(extra="forbid")
    trial: int
    recipe: str  # the recipe file, relative to the run directory
    search: dict[str, float]  # objective -> score on the search items
    selection: dict[str, float] = {}  # objective -> score on the selection items; empty where it was not re-scored
    heldout: dict[str, float]  # task -> score on the held-out items, AVERAGE included
    items: int  # what its search evaluation cost: the items it was scored on


class BestModel(FrontMember):
    """The evolved recipe the search recommends, with its held-out AVERAGE comparisons: the front's best by
    search score, or with a selection split the best there of the top candidates (which may be off the front)."""

    chosen_by: str  # how it was picked, e.g. "highest mean search score"
    best_parent: str | None = None
    vs_parent: PairedDiff | None = None
    best_baseline: str | None = None
    vs_baseline: PairedDiff | None = None
    # (its average - best parent's) / (ceiling's - best parent's) on held-out; None without a gap or a ceiling
    ceiling_share: float | None = None


class Gate(BaseModel):
    """Did the recommended evolved recipe beat the best parent and the best tuned baseline where it was chosen?"""

    model_config = ConfigDict(extra="forbid")
    passed: bool
    reason: str  # one plain sentence with the scores compared
    chosen: str  # the entry best.yml holds: the evolved one if passed, else the stronger reference


class TrialCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    complete: int
    stopped: int = 0  # by fitness rungs at a cheaper rung: scored, but on fewer items
    failed: int
    items: int  # what the search cost: items scored by every finished trial, failed ones included where known
    # What the final comparison cost on top: the tuning grids on the search split, selection and held-out scoring.
    final_items: int


class RunSummary(BaseModel):
    """RUN_DIR/summary.json: what a finished (or interrupted) search found."""

    model_config = ConfigDict(extra="forbid")
    parents: list[ModelScores]
    baselines: list[ModelScores]
    front: list[FrontMember]
    best: BestModel | None
    ceiling: ModelScores | None = None  # each held-out task's best parent (two or more tasks)
    gate: Gate | None = None  # None: no complete trial to gate
    trials: TrialCounts
    wall_s: float


def write_summary(run: RunDir, summary: RunSummary) -> None:
    run.write_json(run.summary, summary.model_dump(mode="json"))


def read_summary(run: RunDir) -> RunSummary:
    try:
        return RunSummary.model_validate_json(run.read_text(run.summary))
    except ValidationError as err:
        raise from_validation(err, str(run.summary), RunSummary) from None
