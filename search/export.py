"""`evomerge export`: a front member of a finished search as mergekit YAML that `mergekit-yaml` reproduces."""

from pathlib import Path

import yaml

from merge_core import Recipe
from search.report import FrontMember, read_summary

RESOLVED_CONFIG = "search.yml"  # the run dir's copy of the config, every default filled in


def export_text(recipe_yaml: str, seed: int) -> str:
    """The recipe with a header saying how to reproduce it (the seed matters for DARE/DELLA)."""
    recipe = Recipe.from_yaml(recipe_yaml)
    if recipe.method.random:
        how = f"# reproduce: mergekit-yaml THIS_FILE OUT_DIR --random-seed {seed}  (on CPU; evomerge merge --seed {seed})\n"
    else:
        how = "# reproduce: mergekit-yaml THIS_FILE OUT_DIR  (or evomerge merge THIS_FILE OUT_DIR)\n"
    return f"# evolved by evomerge\n{how}{recipe.to_yaml()}"


def choose(run_dir: Path, front: list[FrontMember], objective: str | None, rank: int | None) -> FrontMember:
    if objective is not None:
        config = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text())
        directions = {o["task"]: o["direction"] for o in config["objectives"]}
        if objective not in directions:
            raise ValueError(f"{run_dir}: --objective: expected one of {sorted(directions)}, got {objective!r}")
        sign = 1.0 if directions[objective] == "maximize" else -1.0
        return max(front, key=lambda member: sign * member.search[objective])
    if rank is not None:
        if not 1 <= rank <= len(front):
            raise ValueError(f"{run_dir}: --rank: expected 1 to {len(front)} (the front's size), got {rank}")
        return front[rank - 1]
    return front[0]


def export_recipe(run_dir: Path, objective: str | None = None, rank: int | None = None) -> str:
    """The front member asked for (default: the best, as summary.json ranks the front) as mergekit YAML."""
    summary = read_summary(run_dir)
    if not summary.front:
        raise ValueError(f"{run_dir}: summary.json: the search has no complete trial to export")
    member = choose(run_dir, summary.front, objective, rank)
    seed = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text())["seed"]
    return export_text((run_dir / member.recipe).read_text(), seed)
