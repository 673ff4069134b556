"""Search quality on the demo toy family: CMA-ES and NSGA-II vs random search at equal budget, vs mergekit's
default recipes and a tuned single λ, vs the parents — all on the held-out split the search never saw.

    .venv/bin/python experiments/bench_search.py [--seeds 0,1,2] [--skills srt,rev,cae]
        [--optimizers cmaes,cmaes+rungs,cmaes+sep,random] [--trials 60] [--rungs 25,75,200] [--layer-granularity 1]

Every variant gets the same item budget: what `--trials` full-fidelity candidates cost. A `+rungs` variant
scores candidates with fitness.rungs (asynchronous successive halving), so it sees more candidates for it; a
`+coarse` variant sets optimizer.coarse_to_fine (the one-knob grid first, charged to the same budget); a
`+sep` variant sets optimizer.covariance: diagonal (separable CMA-ES). Every
variant after the first is also compared with the first, paired on the same held-out items.

Each seed builds (or reuses) its own demo family (family seed = search seed), since whether a base picks up a
skill varies by seed. Per run it prints the best recipe's held-out average with its paired bootstrap CI
against the best parent and the best baseline, and the items it needed to reach random search's final
full-fidelity search-split score. NSGA-II searches the three skills as three objectives (a Pareto front); its "best" is the
front member with the highest mean search score, as the runner reports it.
"""

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import yaml

from evaluators.toy_family import Family, build_family
from search.demo import DEMO_CONFIG, FAMILY_PLACEHOLDER
from search.results.statistics import PairedDiff, paired_bootstrap
from search.results.summary import RunSummary
from search.run_dir import RunDir
from search.runner import run_search


def config_for(
    family: Family, variant: str, seed: int, trials: int, rungs: list[int], out: Path, layer_granularity: int | None
) -> Path:
    config = yaml.safe_load(DEMO_CONFIG.read_text().replace(FAMILY_PLACEHOLDER, str(family.root)))
    # The demo config names the default skills; another triple swaps in its children and held-out tasks.
    config["models"]["fine_tunes"] = [str(path) for path in family.children.values()]
    config["held_out"]["tasks"] = [{"task": task, "metric": "acc"} for task in family.test_tasks.values()]
    optimizer, *extras = variant.split("+")
    unknown = set(extras) - {"rungs", "coarse", "sep"}
    if unknown:
        raise SystemExit(f"--optimizers: expected NAME[+rungs][+coarse][+sep], got {variant!r}")
    config["optimizer"]["name"] = optimizer
    config["optimizer"]["coarse_to_fine"] = "coarse" in extras
    if "sep" in extras:
        config["optimizer"]["covariance"] = "diagonal"
    if layer_granularity:
        config["genome"]["layer_granularity"] = layer_granularity
    tasks = 3  # toy_search: one task per skill
    config["budget"] = {"trials": None, "item_evals": trials * config["fitness"]["limit"] * tasks}
    if "rungs" in extras:
        config["fitness"]["rungs"] = rungs
    config["seed"] = seed
    config["output_dir"] = str(out / "run")
    if optimizer == "nsga2":
        config["objectives"] = [{"task": task, "metric": "acc"} for task in family.search_tasks.values()]
    path = out / "search.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def best_so_far(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per finished trial (in trial order): the items spent so far, and the best full-fidelity mean search score
    so far (a trial stopped at a cheaper rung costs items but sets no best)."""
    with sqlite3.connect(run_dir / "optuna.db") as db:
        rows = db.execute(
            "select t.number, t.state, avg(v.value), max(a.value_json) from trials t "
            "left join trial_values v on v.trial_id = t.trial_id "
            "left join trial_user_attributes a on a.trial_id = t.trial_id and a.key = 'items' "
            "where t.state in ('COMPLETE', 'PRUNED', 'FAIL') group by t.trial_id order by t.number"
        ).fetchall()
    items = np.cumsum([json.loads(spent or "0") for *_, spent in rows])
    scores = np.array([value if state == "COMPLETE" else -np.inf for _, state, value, _ in rows])
    return items, np.maximum.accumulate(scores)


def items_to_reach(curve: tuple[np.ndarray, np.ndarray], target: float) -> int | None:
    items, best = curve
    reached = np.nonzero(best >= target - 1e-12)[0]
    return int(items[reached[0]]) if reached.size else None


def paired(items: dict, a: str, b: str, seed: int) -> PairedDiff:
    """a minus b on the held-out average: the per-task item vectors concatenated, as the report pairs them."""
    tasks = sorted(items[a])
    return paired_bootstrap(
        np.concatenate([items[a][t] for t in tasks]), np.concatenate([items[b][t] for t in tasks]), seed=seed
    )


def fmt(diff: PairedDiff) -> str:
    return f"{diff.mean_diff:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]{'*' if diff.excludes_zero else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--skills", default="srt,rev,cae", help="the family's fine-tunes, one per skill")
    parser.add_argument("--optimizers", default="cmaes,cmaes+rungs,random")
    parser.add_argument("--trials", type=int, default=60, help="the item budget, in full-fidelity candidates")
    parser.add_argument("--rungs", default="25,75,200")
    parser.add_argument("--layer-granularity", type=int, help="layers per gene group (the demo's 3: one group)")
    args = parser.parse_args()
    optimizers = args.optimizers.split(",")
    rungs = [int(size) for size in args.rungs.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    lines = []
    for seed in map(int, args.seeds.split(",")):
        family = build_family(size="demo", seed=seed, skills=args.skills)
        summaries: dict[str, RunSummary] = {}
        curves = {}
        for optimizer in optimizers:
            out = root / f"seed{seed}-{optimizer}"
            out.mkdir()
            summaries[optimizer] = run_search(
                config_for(family, optimizer, seed, args.trials, rungs, out, args.layer_granularity), say=lambda _: None
            )
            curves[optimizer] = best_so_far(out / "run")
        reference = summaries[optimizers[0]]
        parents = {p.name: p.heldout["average"] for p in reference.parents}
        defaults = {b.name: b.heldout["average"] for b in reference.baselines}
        lines.append(f"seed {seed}: parents " + ", ".join(f"{n} {v:.3f}" for n, v in parents.items()))
        lines.append(f"seed {seed}: baselines " + ", ".join(f"{n} {v:.3f}" for n, v in defaults.items()))
        if reference.ceiling:
            lines.append(f"seed {seed}: ceiling {reference.ceiling.heldout['average']:.3f}")
        target = curves["random"][1][-1] if "random" in curves else None
        for optimizer, summary in summaries.items():
            items = json.loads(RunDir(root / f"seed{seed}-{optimizer}" / "run").heldout_items.read_text())
            best = f"evolved #{summary.best.trial}"
            reach = items_to_reach(curves[optimizer], target) if target is not None else None
            against = [max(parents, key=parents.get), *defaults]
            diffs = " | ".join(f"vs {name} {fmt(paired(items, best, name, seed))}" for name in against)
            if optimizer != optimizers[0]:
                first = RunDir(root / f"seed{seed}-{optimizers[0]}" / "run")
                combined = {
                    **items,
                    "first": json.loads(first.heldout_items.read_text())[
                        f"evolved #{summaries[optimizers[0]].best.trial}"
                    ],
                }
                diffs += f" | vs {optimizers[0]} {fmt(paired(combined, best, 'first', seed))}"
            lines.append(
                f"seed {seed}: {optimizer:>6} held-out avg {summary.best.heldout['average']:.3f} | {diffs} | "
                f"ceiling share {summary.best.ceiling_share} | "
                f"search best {curves[optimizer][1][-1]:.3f} | items to reach random's final {reach} "
                f"of {summary.trials.items} | {summary.trials.complete} full, {summary.trials.failed} failed, "
                f"{summary.trials.stopped} stopped early"
            )
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
