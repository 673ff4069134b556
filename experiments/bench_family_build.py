"""Toy family build time: children trained one after another vs in worker processes; the base at 1 vs 2 threads.

    .venv/bin/python experiments/bench_family_build.py [--sizes test,demo] [--workers 2,3] [--repeats 2]
                                                       [--probe-steps 300]

Each run builds every size from nothing in a fresh temporary cache, serially (workers=1) and then with each
worker count, and prints the wall time, the base's share of it (the rest: children, scoring, saving), the ratio
to the serial build of the same run, and whether every safetensors file is byte-identical to the serial build's
and to the family in the default cache, when one with the same key is there ("-" when none is).
--probe-steps N then times N steps of base training per size at 1 and 2 torch threads (each twice, interleaved)
and says whether the weights come out the same.
"""

import argparse
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import torch

from evaluators.toy_family import DEFAULT_SKILLS, SIZES, build_family
from evaluators.toy_family.build import THREADS, _base_mix, default_cache_dir
from evaluators.toy_family.splits import training_stream
from evaluators.toy_family.training import new_model, torch_threads, train


def weights(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def timed_build(size: str, workers: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-family-{size}-") as cache:
        started = time.perf_counter()
        family = build_family(size=size, cache_dir=Path(cache), workers=workers)
        return time.perf_counter() - started, {"manifest": family.manifest, "weights": weights(family.root)}


def bench_builds(size: str, worker_counts: list[int], run: int) -> None:
    serial_s, serial = timed_build(size, 1)
    cached = default_cache_dir() / serial["manifest"]["key"]
    reference = weights(cached) if (cached / "manifest.json").exists() else None
    for workers, (seconds, built) in [(1, (serial_s, serial)), *((w, timed_build(size, w)) for w in worker_counts)]:
        base_s = built["manifest"]["timings_s"]["base"]
        same_serial = "yes" if built["weights"] == serial["weights"] else "NO"
        same_cache = "-" if reference is None else "yes" if built["weights"] == reference else "NO"
        print(
            f"{run:>3} {size:>5} {built['manifest']['parameters']:>7} {workers:>7} {seconds:>8.1f} {base_s:>7.1f} "
            f"{seconds - base_s:>7.1f} {seconds / serial_s:>7.2f} {same_serial:>12} {same_cache:>11}",
            flush=True,
        )


def probe_threads(size: str, steps: int) -> None:
    recipe = dataclasses.replace(SIZES[size].base, steps=steps)
    results: dict[int, list[tuple[float, torch.Tensor]]] = {1: [], 2: []}
    for threads in (1, 2, 1, 2):
        with torch_threads(threads):
            model = new_model(SIZES[size].architecture, 0)
            stream = training_stream(_base_mix(DEFAULT_SKILLS), frozenset(), random.Random("0:base"))
            started = time.perf_counter()
            train(model, stream, recipe)
            seconds = time.perf_counter() - started
        results[threads].append((seconds, torch.cat([p.detach().flatten() for p in model.parameters()])))
    same = all(torch.equal(results[1][0][1], w) for runs in results.values() for _, w in runs)
    ms = {t: [1000 * s / steps for s, _ in runs] for t, runs in results.items()}
    print(
        f"{size:>5} {steps:>6} {ms[1][0]:>8.1f} {ms[1][1]:>8.1f} {ms[2][0]:>8.1f} {ms[2][1]:>8.1f} "
        f"{ms[1][0] / ms[2][0]:>6.2f} {ms[1][1] / ms[2][1]:>6.2f} {'yes' if same else 'NO':>13}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="test,demo")
    parser.add_argument("--workers", default="2,3", help="worker counts to compare with the serial build")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--probe-steps", type=int, default=300, help="0: skip the thread probe")
    args = parser.parse_args()
    sizes, worker_counts = args.sizes.split(","), [int(w) for w in args.workers.split(",")]
    print(f"torch {torch.__version__}, {THREADS} thread(s) per process, skills {','.join(DEFAULT_SKILLS)}, seed 0")
    if args.repeats:
        print("run  size  params workers  total s  base s  rest s  /serial  same/serial  same/cache")
    for run in range(1, args.repeats + 1):
        for size in sizes:
            bench_builds(size, worker_counts, run)
    if args.probe_steps:
        print("\nbase ms/step at 1 and 2 threads, two interleaved runs each; speedup = 1 thread / 2 threads")
        print(" size  steps  1t run1  1t run2  2t run1  2t run2  gain1  gain2  same weights")
        for size in sizes:
            probe_threads(size, args.probe_steps)


if __name__ == "__main__":
    main()
