"""`evomerge export`: a front member of a finished search as mergekit YAML that `mergekit-yaml` reproduces."""

from pathlib import Path

import yaml

from merge_core import Recipe
from merge_core.errors import InputError
from search.results.summary import FrontMember, read_summary
from search.run_dir import RunDir


def export_text(recipe_yaml: str, seed: int) -> str:
    """The recipe with a header saying how to reproduce it (the seed matters for DARE/DELLA)."""
    recipe = Recipe.from_yaml(recipe_yaml)
    if recipe.method.random:
        how = f"# reproduce: mergekit-yaml THIS_FILE OUT_DIR --random-seed {seed}  (on CPU; evomerge merge --seed {seed})\n"
    else:
        how = "# reproduce: mergekit-yaml THIS_FILE OUT_DIR  (or evomerge merge THIS_FILE OUT_DIR)\n"
    return f"# evolved by evomerge\n{how}{recipe.to_yaml()}"


def choose(run: RunDir, front: list[FrontMember], config: dict, objective: str | None, rank: int | None) -> FrontMember:
    if objective is not None:
        directions = {o["task"]: o["direction"] for o in config["objectives"]}
        if objective not in directions:
            raise InputError(run.path, "--objective", f"expected one of {sorted(directions)}, got {objective!r}")
        sign = 1.0 if directions[objective] == "maximize" else -1.0
        return max(front, key=lambda member: sign * member.search[objective])
    if rank is not None:
        if not 1 <= rank <= len(front):
            raise InputError(run.path, "--rank", f"expected 1 to {len(front)} (the front's size), got {rank}")
        return front[rank - 1]
    return front[0]


def export_recipe(run_dir: Path, objective: str | None = None, rank: int | None = None) -> str:
    """The front member asked for (default: the best, as summary.json ranks the front) as mergekit YAML."""
    run = RunDir.open(run_dir)
    summary = read_summary(run)
    if not summary.front:
        raise InputError(run.summary, "front", "the search has no complete trial to export")
    config = yaml.safe_load(run.read_text(run.resolved_config))
    member = choose(run, summary.front, config, objective, rank)
    return export_text(run.read_text(run.path / member.recipe), config["seed"])
