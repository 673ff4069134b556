"""RUN_DIR/summary.json: what a finished search found, as validated data that export and reviewers read."""

from pydantic import BaseModel, ConfigDict, ValidationError

from merge_core.errors import from_validation
from search.results.statistics import PairedDiff
from search.run_dir import RunDir


class ModelScores(BaseModel):
    """A parent or baseline: held-out score per task, AVERAGE included."""

    model_config = ConfigDict(extra="forbid")
    name: str
    heldout: dict[str, float]


class FrontMember(BaseModel):
    """An evolved recipe on the final Pareto front."""

    model_config = ConfigDict(extra="forbid")
    trial: int
    recipe: str  # the recipe file, relative to the run directory
    search: dict[str, float]  # objective -> score on the search items
    heldout: dict[str, float]  # task -> score on the held-out items, AVERAGE included


class BestModel(FrontMember):
    """The front member the search recommends, with its held-out AVERAGE comparisons."""

    chosen_by: str  # how it was picked, e.g. "highest mean search score"
    best_parent: str | None = None
    vs_parent: PairedDiff | None = None
    best_baseline: str | None = None
    vs_baseline: PairedDiff | None = None


class TrialCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    complete: int
    failed: int


class RunSummary(BaseModel):
    """RUN_DIR/summary.json: what a finished (or interrupted) search found."""

    model_config = ConfigDict(extra="forbid")
    parents: list[ModelScores]
    baselines: list[ModelScores]
    front: list[FrontMember]
    best: BestModel | None
    trials: TrialCounts
    wall_s: float


def write_summary(run: RunDir, summary: RunSummary) -> None:
    run.write_json(run.summary, summary.model_dump(mode="json"))


def read_summary(run: RunDir) -> RunSummary:
    try:
        return RunSummary.model_validate_json(run.read_text(run.summary))
    except ValidationError as err:
        raise from_validation(err, str(run.summary), RunSummary) from None
