"""`evomerge export`: best.yml's recipe, or a front member of a finished search, as mergekit YAML that
`mergekit-yaml` reproduces (genome.kind moe: a mergekit-moe config that `evomerge moe` and mergekit-moe do)."""

from pathlib import Path

import yaml

from merge_core import Recipe
from merge_core.errors import InputError
from merge_core.moe_config import RANDOM_MODES, MoEConfig, read_candidate
from search.genome.data_flow import STAGE1
from search.results.summary import FrontMember, RunSummary, read_summary
from search.run_dir import RunDir


def export_text(run: RunDir, recipe_yaml: str, seed: int, about: str = "evolved by evomerge") -> str:
    """The recipe under a header: what it is (`about`, one comment line per line) and how to reproduce it (the
    seed matters for DARE/DELLA). A layer path over a ps+dfs stage-1 merge is written as mergekit-multi's
    two-document form: the stage-1 merge named `stage1`, then the path reading it by that name; an MoE
    candidate as the mergekit-moe config it is."""
    recipe = read_candidate(recipe_yaml)
    header = "".join(f"# {line}\n" for line in about.splitlines())
    if isinstance(recipe, MoEConfig):
        return f"{header}{moe_how(recipe, seed)}{recipe.to_yaml()}"
    if STAGE1 in recipe.model_refs():
        stage1 = Recipe.from_yaml(run.read_text(run.stage1)).model_copy(update={"name": STAGE1})
        seeded = f" --random-seed {seed}" if stage1.method.random else ""
        how = f"# reproduce: mergekit-multi THIS_FILE --intermediate-dir STAGES_DIR --out-path OUT_DIR{seeded}  (on CPU)\n"
        return f"{header}{how}{stage1.to_yaml()}---\n{recipe.to_yaml()}"
    if recipe.method.random:
        how = f"# reproduce: mergekit-yaml THIS_FILE OUT_DIR --random-seed {seed}  (on CPU; evomerge merge --seed {seed})\n"
    else:
        how = "# reproduce: mergekit-yaml THIS_FILE OUT_DIR  (or evomerge merge THIS_FILE OUT_DIR)\n"
    return f"{header}{how}{recipe.to_yaml()}"


def moe_how(config: MoEConfig, seed: int) -> str:
    """How to rebuild an MoE candidate; the seed matters to random gate modes and noise_scale only."""
    if config.gate_mode in RANDOM_MODES or any(expert.noise_scale is not None for expert in config.experts):
        return f"# reproduce: evomerge moe THIS_FILE OUT_DIR --seed {seed}  (mergekit-moe THIS_FILE OUT_DIR --random-seed {seed})\n"
    return "# reproduce: evomerge moe THIS_FILE OUT_DIR  (or mergekit-moe THIS_FILE OUT_DIR)\n"


def best_text(run: RunDir, summary: RunSummary, seed: int) -> str:
    """best.yml: the recommended evolved recipe, or the parent / tuned baseline the gate chose instead of it."""
    gate = summary.gate
    if gate is None or gate.passed:
        return export_text(run, run.read_text(run.path / summary.best.recipe), seed)
    references = {entry.name: entry.recipe for entry in [*summary.parents, *summary.baselines] if entry.recipe}
    if gate.chosen not in references:
        raise InputError(
            run.summary, "gate.chosen", f"expected a parent or baseline with a recipe, got {gate.chosen!r}"
        )
    about = (
        f"not evolved: {gate.chosen}, because {gate.reason}\n"
        "`evomerge export RUN_DIR --evolved` writes the evolved recipe instead"
    )
    return export_text(run, references[gate.chosen], seed, about)


def choose(run: RunDir, summary: RunSummary, config: dict, objective: str | None, rank: int | None) -> FrontMember:
    """The front member of best `objective` score, or of `rank`; neither: the recommended evolved recipe (a
    selection split may have picked it off the front)."""
    front = summary.front
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
    return summary.best


def export_recipe(run_dir: Path, objective: str | None = None, rank: int | None = None, evolved: bool = False) -> str:
    """The front member asked for as mergekit YAML; asked for none, what best.yml holds: the best evolved recipe
    (summary.json's best), or the reference the gate chose when that one did not beat it.
    `evolved`: the best evolved recipe whatever the gate said."""
    run = RunDir.open(run_dir)
    summary = read_summary(run)
    if not summary.front:
        raise InputError(run.summary, "front", "the search has no complete trial to export")
    config = yaml.safe_load(run.read_text(run.resolved_config))
    if objective is None and rank is None and not evolved:
        return best_text(run, summary, config["seed"])
    member = choose(run, summary, config, objective, rank)
    return export_text(run, run.read_text(run.path / member.recipe), config["seed"])
