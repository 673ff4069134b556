"""Which toy skills train at each size, and do plain task-arithmetic merges beat every parent?

    HF_HUB_OFFLINE=1 python experiments/toy_family_regime.py --size test --skills srt,rev,cae --seeds 0,1,2 --merge

Per seed: trains a base on copy + a little of each listed skill and one child per skill (no files written),
prints each model's accuracy per skill on the search and test splits and, with --merge, task arithmetic of
all children (base + sum_i w_i * (child_i - base)) at one shared lambda and with per-child weights tuned on
the search split, against the best parent on the held-out test average.
"""

import argparse
import dataclasses
import itertools
import json
import time

import torch

from evaluators.toy_family.build import SIZES, THREADS, default_workers, train_models
from evaluators.toy_family.scoring import accuracy
from evaluators.toy_family.skills import SKILLS
from evaluators.toy_family.splits import make_splits

LAMBDAS = (0.25, 0.5, 0.75, 1.0)
WEIGHT_GRID = (0.25, 0.5, 0.75, 1.0, 1.25)


def average(model, splits, split: str) -> float:
    return sum(accuracy(model, splits[s][split]) for s in splits) / len(splits)


def merged(models: dict, skills: list[str], weights: tuple[float, ...]):
    base = models["base"].state_dict()
    deltas = [{k: models[s].state_dict()[k] - v for k, v in base.items()} for s in skills]
    state = {k: v + sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k, v in base.items()}
    model = models["base"].__class__(models["base"].config)
    model.load_state_dict(state)
    return model.eval()


def run_seed(size, skills: list[str], seed: int, split_seed: int, merge: bool) -> dict:
    splits = {
        s: make_splits(SKILLS[s], n_search=size.n_search, n_test=size.n_test, split_seed=split_seed) for s in skills
    }
    held_out = frozenset(p for by_split in splits.values() for items in by_split.values() for p, _ in items)
    started = time.perf_counter()
    models, _, timings = train_models(size, skills, seed, held_out, workers=default_workers(size, len(skills)))
    result = {
        "seed": seed,
        "train_s": round(time.perf_counter() - started, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "search": {n: {s: accuracy(m, splits[s]["search"]) for s in skills} for n, m in models.items()},
        "test_avg": {n: average(m, splits, "test") for n, m in models.items()},
    }
    if not merge:
        return result
    search_by_lambda = {lam: average(merged(models, skills, (lam,) * len(skills)), splits, "search") for lam in LAMBDAS}
    best_lambda = max(search_by_lambda, key=search_by_lambda.get)
    tuned = max(
        itertools.product(WEIGHT_GRID, repeat=len(skills)),
        key=lambda w: average(merged(models, skills, w), splits, "search"),
    )
    result["merge"] = {
        "best_parent_test_avg": max(result["test_avg"].values()),
        "ta_test_avg": {lam: average(merged(models, skills, (lam,) * len(skills)), splits, "test") for lam in LAMBDAS},
        "ta_lambda_chosen_on_search": best_lambda,
        "tuned_weights": tuned,
        "tuned_test_avg": average(merged(models, skills, tuned), splits, "test"),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="test")
    parser.add_argument("--skills", default="srt,rev,cae", help="comma-separated; any number for screening")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--base-steps", type=int, help="override the size's base steps")
    parser.add_argument("--child-lr", type=float, help="override the size's child learning rate")
    parser.add_argument("--child-steps", type=int, help="override the size's child steps")
    parser.add_argument("--share", action="append", default=[], help="skill=base_share override, repeatable")
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args()

    size = SIZES[args.size]
    if args.base_steps:
        size = dataclasses.replace(size, base=dataclasses.replace(size.base, steps=args.base_steps))
    child = {"lr": args.child_lr, "steps": args.child_steps}
    size = dataclasses.replace(size, child=dataclasses.replace(size.child, **{k: v for k, v in child.items() if v}))
    for override in args.share:  # the registry is this process's own: overriding it here changes nothing else
        name, share = override.split("=")
        SKILLS[name] = dataclasses.replace(SKILLS[name], base_share=float(share))
    torch.set_num_threads(THREADS)
    skills = [s for s in SKILLS if s in args.skills.split(",")]  # registry order, as build_family trains them
    shares = {s: SKILLS[s].base_share for s in skills}
    print(json.dumps({"size": args.size, "recipe": dataclasses.asdict(size), "skills": skills, "shares": shares}))
    for seed in map(int, args.seeds.split(",")):
        print(json.dumps(run_seed(size, skills, seed, args.split_seed, args.merge)), flush=True)


if __name__ == "__main__":
    main()
