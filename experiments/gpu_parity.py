"""Every deterministic merge method on the GPU against the same merge on the CPU (experiments/gpu_check.sh).

    .venv/bin/python experiments/gpu_parity.py [--device cuda] [--size 25M]

A random Llama family (bench_merge.py's builder, float32) is merged by each method's recipe on the CPU (the
semantics mergekit is matched against bit for bit) and on `--device`, in one MergeSession each. Methods that
draw random masks (DARE, DELLA) are left out: their masks come from the device's own RNG, so their CPU
semantics are the contract (tests/test_methods_parity.py). Tolerance: float32 reductions (sums over models,
norms, the sort TIES ranks by) may run in another order on a GPU, so each tensor may differ by a few ulp of
its largest entry: |gpu - cpu| <= 1e-5 * max(|cpu|) per tensor. Exits 1 if any tensor is beyond it.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from bench_merge import SIZES, build_family

from merge_core import MergeSession, Recipe
from merge_core.methods import METHODS

RELATIVE_TOLERANCE = 1e-5
PARAMETERS = {"weight": 0.6, "density": 0.5, "gamma": 0.01, "t": 0.4}


def recipes(paths: list[str]) -> dict[str, Recipe]:
    """One recipe per deterministic method, each over the family, with the method's own parameters."""
    base, children = paths[0], paths[1:]
    out = {}
    for name, method in METHODS.items():
        if method.random or name == "passthrough":  # passthrough copies: nothing to compare
            continue
        wanted = [p.name for p in method.params if p.name in PARAMETERS and not p.inert]
        models = children[: method.max_models - (method.base != "ignored")] if method.max_models else children
        entries = [
            {"model": m, "parameters": {k: PARAMETERS[k] for k in wanted if method.param(k).per_model}} for m in models
        ]
        recipe = {"merge_method": name, "models": entries}
        shared = {k: PARAMETERS[k] for k in wanted if not method.param(k).per_model}
        if shared:
            recipe["parameters"] = shared
        if method.base != "ignored":
            recipe["base_model"] = base
        out[name] = Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="25M", choices=sorted(SIZES))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{args.device}: torch sees no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    paths = build_family(Path(tempfile.mkdtemp(prefix="gpu-parity-")), args.size)
    cpu, device = MergeSession(paths), MergeSession(paths, device=args.device)
    print(f"| method | tensors | worst |gpu − cpu| / max |cpu| | within {RELATIVE_TOLERANCE:g} |")
    print("|---|---|---|---|")
    failed = False
    for name, recipe in recipes(paths).items():
        reference, ours = cpu.materialize(recipe), device.materialize(recipe)
        worst = max(
            float((ours[t].cpu() - reference[t]).abs().max() / reference[t].abs().max().clamp_min(1e-30))
            for t in reference
        )
        ok = worst <= RELATIVE_TOLERANCE
        failed |= not ok
        print(f"| {name} | {len(reference)} | {worst:.2e} | {'yes' if ok else 'NO'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
