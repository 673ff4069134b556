"""The MoE genome (genome.kind moe: which experts are in, each one's residual_scale) on demo toy families,
against the plain MoE of every expert (mergekit-moe's config as given), the parents, and the tuned weight merges,
all on the held-out split the search never saw.

    .venv/bin/python experiments/bench_moe_search.py [--seeds 0] [--trials 60] [--experts-per-token 1]
        [--gate-mode hidden]

Per family (family seed = search seed): the mergekit-moe config routes each child (one skill each) by its skill's
first 8 search-split prompts, the base gives attention, norms and embeddings; CMA-ES searches it for `--trials`
candidates' items, the demo's fitness and held-out items. Differences: paired bootstrap over held-out items, 95%.
"""

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from bench_search import config_for, fmt, paired

from evaluators.toy_family import build_family
from search.results.final import PLAIN_MOE_REFERENCE
from search.run_dir import RunDir
from search.runner import run_search

PROMPTS = 8


def prompts(tasks_dir: Path, skill: str) -> list[str]:
    lines = (tasks_dir / f"toy_{skill}_search.jsonl").read_text().splitlines()[:PROMPTS]
    return [json.loads(line)["prompt"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--experts-per-token", type=int, default=1)
    parser.add_argument("--gate-mode", default="hidden")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    lines = []
    for seed in map(int, args.seeds.split(",")):
        family = build_family(size="demo", seed=seed)
        out = root / f"seed{seed}"
        out.mkdir()
        experts = [
            {"source_model": str(path), "positive_prompts": prompts(family.root / "tasks", skill)}
            for skill, path in family.children.items()
        ]
        moe = {"base_model": str(family.base), "gate_mode": args.gate_mode, "dtype": "float32"}
        moe |= {"experts_per_token": args.experts_per_token, "experts": experts}
        (out / "moe.yml").write_text(yaml.safe_dump(moe))
        config = yaml.safe_load(config_for(family, "cmaes", seed, args.trials, [], out, None).read_text())
        del config["models"], config["merge"]
        config["genome"] = {"kind": "moe", "moe": {"config": "moe.yml"}}
        config["evaluation"]["dtype"] = "auto"
        config["optimizer"].pop("popsize")  # pycma's default for 6 genes
        (out / "search.yml").write_text(yaml.safe_dump(config))
        summary = run_search(out / "search.yml", say=lambda _: None)
        items = json.loads(RunDir(out / "run").heldout_items.read_text())
        best = f"evolved #{summary.best.trial}"
        parents = {p.name: p.heldout["average"] for p in summary.parents}
        references = {b.name: b.heldout["average"] for b in summary.baselines}
        best_parent = max(parents, key=parents.get)
        tuned = max((n for n in references if n != PLAIN_MOE_REFERENCE), key=references.get)
        lines.append(f"seed {seed}: parents " + ", ".join(f"{n} {v:.3f}" for n, v in parents.items()))
        lines.append(f"seed {seed}: references " + ", ".join(f"{n} {v:.3f}" for n, v in references.items()))
        diffs = " | ".join(
            f"vs {n} {fmt(paired(items, best, n, seed))}" for n in (PLAIN_MOE_REFERENCE, best_parent, tuned)
        )
        recipe = yaml.safe_load(RunDir(out / "run").read_text(out / "run" / summary.best.recipe))
        kept = ", ".join(f"{Path(e['source_model']).name} x{e.get('residual_scale', 1):g}" for e in recipe["experts"])
        lines.append(
            f"seed {seed}: evolved MoE held-out {summary.best.heldout['average']:.3f} ({kept}) | {diffs} | "
            f"gate chose {summary.gate.chosen} | {summary.trials.complete} trials, {summary.trials.items} items"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
