"""Layer paths (data-flow space) against weight merges (parameter space) at an equal item budget, on toy
families deep enough to choose layers from (size `deep`: 6 layers), all scored on the held-out split.

    .venv/bin/python experiments/bench_data_flow.py [--seeds 0,1,2] [--size deep] [--trials 30]
        [--coarse] [--scale-bounds 0.5,1.5]

Per family (family seed = search seed), four searches, CMA-ES, the demo's fitness and held-out items:
  ps       the demo's TIES weight search (weight, density per module group), `--trials` candidates' items
  dfs      layer paths over the fine-tunes' layers (2 repeats, up to twice the depth), the same items
  ps+dfs   a ps search on half the items, then paths over its best.yml and the fine-tunes on the other half
--coarse: the path searches' CMA-ES starts from the best whole-depth path (optimizer.coarse_to_fine) instead
of the middle of the genome, where every slot sits on the include threshold.
Each best is compared on the held-out items (paired bootstrap, 95%) with the best parent, the best tuned
baseline (task arithmetic, TIES, DARE-TIES, tuned on the search split in the ps run; the one with the highest
held-out average is taken, which favours the baseline), and the ps search's best. All runs score the same
held-out items, so every pair is paired item by item.

Then the path model's cost: building a path (rewiring the live model over the resident layers) against one
forward pass of an evaluation batch and against materializing the same path as weights (session.apply).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_search import config_for, fmt, paired
from transformers import AutoModelForCausalLM

from evaluators.toy_family import Family, build_family
from merge_core import MergeSession
from merge_core.path_model import PathModel
from search.config import SearchConfig
from search.genome.data_flow import PathGenome, path_line
from search.results.summary import RunSummary
from search.run_dir import RunDir
from search.runner import run_search

TUNED = "(tuned on search)"


def path_config(ps_config: Path, kind: str, trials: int, stage1: Path | None, options: argparse.Namespace) -> Path:
    """The ps config turned into a path search of `trials` candidates' items: passthrough, no weight genome."""
    config = yaml.safe_load(ps_config.read_text())
    limit, tasks = config["fitness"]["limit"], 3
    config["merge"] = {"method": "passthrough", "dtype": config["merge"]["dtype"]}
    dfs = {"repeats": 2, "scale_bounds": options.scale_bounds} | ({"stage1": str(stage1)} if stage1 else {})
    config["genome"] = {"kind": kind, "dfs": dfs}
    config["optimizer"]["coarse_to_fine"] = options.coarse
    config["evaluation"]["dtype"] = "auto"
    config["budget"] = {"trials": None, "item_evals": trials * limit * tasks}
    config["baselines"] = {"tuned": []}  # the ps run tunes them, on the same items
    path = ps_config.parent / f"search-{kind}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def search(config: Path, name: str, out: Path) -> tuple[RunSummary, RunDir]:
    data = yaml.safe_load(config.read_text())
    data["output_dir"] = str(out / name)
    (out / f"{name}.yml").write_text(yaml.safe_dump(data))
    started = time.monotonic()
    summary = run_search(out / f"{name}.yml", say=lambda _: None)
    print(f"  {name}: {time.monotonic() - started:.0f} s, {summary.trials.complete} trials", flush=True)
    return summary, RunDir(out / name)


def best_path(run: RunDir, summary: RunSummary) -> str:
    return path_line(run.read_text(run.path / summary.best.recipe)) or "(not a path)"


def compare(family: Family, seed: int, trials: int, root: Path, options: argparse.Namespace) -> list[str]:
    out = root / f"seed{seed}"
    out.mkdir()
    ps_config = config_for(family, "cmaes", seed, trials, [], out)
    runs = {"ps": search(ps_config, "ps", out)}
    runs["dfs"] = search(path_config(ps_config, "dfs", trials, None, options), "dfs", out)
    (out / "half").mkdir()
    half = config_for(family, "cmaes", seed, trials // 2, [], out / "half")
    data = yaml.safe_load(half.read_text()) | {"baselines": {"tuned": []}}
    half.write_text(yaml.safe_dump(data))
    stage1_summary, stage1_run = search(half, "ps-half", out)
    second = path_config(ps_config, "ps+dfs", trials - trials // 2, stage1_run.best, options)
    runs["ps+dfs"] = search(second, "ps+dfs", out)

    items = {}
    for kind, (summary, run) in runs.items():
        scored = json.loads(run.heldout_items.read_text())
        items[kind] = scored[f"evolved #{summary.best.trial}"]
        if kind == "ps":
            items |= {name: scored[name] for name in scored if not name.startswith("evolved")}
    ps_summary = runs["ps"][0]
    parents = {p.name: p.heldout["average"] for p in ps_summary.parents}
    tuned = {b.name: b.heldout["average"] for b in ps_summary.baselines if b.name.endswith(TUNED)}
    best_parent, best_tuned = max(parents, key=parents.get), max(tuned, key=tuned.get)
    lines = [
        f"seed {seed}: parents " + ", ".join(f"{n} {v:.3f}" for n, v in parents.items())
        + f" | best tuned {best_tuned} {tuned[best_tuned]:.3f} | ps half's best.yml: {stage1_summary.gate.chosen}"
    ]  # fmt: skip
    for kind, (summary, run) in runs.items():
        against = [best_parent, best_tuned] + ([] if kind == "ps" else ["ps"])
        diffs = " | ".join(f"vs {name} {fmt(paired(items, kind, name, seed))}" for name in against)
        path = "" if kind == "ps" else f" | path {best_path(run, summary)}"
        spent = summary.trials.items + (stage1_summary.trials.items if kind == "ps+dfs" else 0)
        lines.append(
            f"seed {seed}: {kind:>6} held-out avg {summary.best.heldout['average']:.3f} | {diffs} | "
            f"{spent} items, {summary.trials.complete} trials{path}"
        )
        print(lines[-1], flush=True)
    return lines


def path_costs(family: Family, repeats: int = 20) -> str:
    """Mean seconds to build a random path, to run one forward of an evaluation batch on it, and to materialize
    the same path as weights into a model of its depth (what a weight merge of a path would pay)."""
    torch.set_num_threads(1)
    models = [str(family.base), *map(str, family.children.values())]
    session = MergeSession(models)
    data = {"models": {"base": models[0], "fine_tunes": models[1:]}, "merge": {"method": "passthrough"},
            "genome": {"kind": "dfs"}, "objectives": [{"task": "toy_search", "metric": "acc"}]}  # fmt: skip
    genome = PathGenome(SearchConfig.from_dict(data, where="bench"), session.num_layers)
    rng = np.random.default_rng(0)
    paths = [genome.path(rng.uniform(genome.lower, genome.upper)) for _ in range(repeats)]
    live = PathModel(session)
    live.build(paths[0])  # the per-source layer stacks are built on first use
    ids = torch.randint(0, live.config.vocab_size, (64, 40), generator=torch.Generator().manual_seed(0))
    build = forward = apply = 0.0
    for path in paths:
        started = time.perf_counter()
        model = live.build(path)
        build += time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            model(ids)
        forward += time.perf_counter() - started
        target = AutoModelForCausalLM.from_config(type(live.config).from_dict(
            live.config.to_dict() | {"num_hidden_layers": len(path)}
        ))  # fmt: skip
        started = time.perf_counter()
        session.apply(path.recipe(), target)
        apply += time.perf_counter() - started
    n = len(paths)
    return (
        f"path model ({family.manifest['size']}, {session.num_layers} layers, {n} random genomes' paths of "
        f"{min(map(len, paths))}-{max(map(len, paths))} layers): build {build / n * 1e3:.2f} ms | "
        f"forward of 64 x 40 tokens {forward / n * 1e3:.1f} ms | weights materialized (session.apply) "
        f"{apply / n * 1e3:.1f} ms | build / forward {build / forward:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="deep")
    parser.add_argument("--trials", type=int, default=30, help="the item budget, in full-fidelity candidates")
    parser.add_argument("--coarse", action="store_true", help="path searches: CMA-ES starts from the best whole path")
    parser.add_argument("--scale-bounds", default="0.5,1.5", help="path searches: genome.dfs.scale_bounds")
    args = parser.parse_args()
    args.scale_bounds = [float(bound) for bound in args.scale_bounds.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-data-flow-"))
    lines = []
    for seed in map(int, args.seeds.split(",")):
        family = build_family(size=args.size, seed=seed)
        if not lines:
            lines.append(path_costs(family))
            print(lines[-1], flush=True)
        lines += compare(family, seed, args.trials, root, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
