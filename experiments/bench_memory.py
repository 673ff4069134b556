"""Peak memory and time per candidate of a search worker's merge session, fast vs lean (merge.memory).

    .venv/bin/python experiments/bench_memory.py [--size 270M] [--methods linear,ties,dare_ties] [--device cuda]

A random Llama family (base + 3 children, float32, bench_merge.py's builder) is written once; then for each
method and mode a fresh process loads a MergeSession and a live model from the base, as a worker does, and
merges three candidates into it. It prints the process's peak RSS divided by the floor (the sources plus the
live model, the least any in-memory session can hold), also with the runtime's own RSS (Python, torch and
transformers imported, before any weight) taken off the peak, the plan's figure for the same session
(search/execution/memory.py's terms), and the seconds per candidate after the first (the fast session's
first candidate also builds its kept state). Each measurement is its own process, so peaks do not mix. On a
GPU (`--device cuda`) the peak is torch's peak allocation on the device, and the runtime is zero.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_merge import SIZES, build_family, recipe_text

WEIGHTS = (0.5, 0.4, 0.6)  # three candidates: each a new recipe, so nothing is reused between them


def status_bytes(field: str) -> int:
    """A figure of this process from /proc/self/status. VmHWM is the peak RSS of this process image: unlike
    getrusage's ru_maxrss it does not carry over the parent's peak through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(method: str, lean: bool, paths: list[str], device: str) -> dict:
    """In a fresh process: the session and live model a worker holds, three candidates merged into it."""
    from transformers import LlamaForCausalLM

    from merge_core import MergeSession, Recipe
    from merge_core.memory import session_bytes, tensor_bytes
    from merge_core.methods import METHODS
    from merge_core.sources import read_info

    gpu = device.startswith("cuda")
    runtime = 0 if gpu else status_bytes("VmRSS")  # Python, torch and transformers imported, no weight yet
    session = MergeSession(paths, device=device, lean=lean)
    live = LlamaForCausalLM.from_pretrained(paths[0], dtype=torch.float32).to(device)
    seconds = []
    for weight in WEIGHTS:
        text = recipe_text(method, paths).replace("weight: 0.5", f"weight: {weight}")
        start = time.perf_counter()
        session.apply(Recipe.from_yaml(text), live)
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    infos = [read_info(path) for path in paths]
    planned = session_bytes(infos, METHODS[method], None, paths[0])
    floor = planned.sources + tensor_bytes(infos[0])
    kept = planned.largest_tensor if lean else planned.casts + planned.prepared
    return {
        "peak": torch.cuda.max_memory_allocated() if gpu else status_bytes("VmHWM"),
        "runtime": runtime,
        "floor": floor,
        "planned": floor + kept,
        "seconds": sum(seconds[1:]) / (len(seconds) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="270M", choices=sorted(SIZES))
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # method, mode, family root
    args = parser.parse_args()
    if args.child:
        method, mode, root = args.child
        paths = [str(p) for p in sorted(Path(root).iterdir())]  # base, child0, child1, child2
        print(json.dumps(child(method, mode == "lean", paths, args.device)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    build_family(root, args.size)
    print(f"family: {args.size}, 4 models at float32 in {root}")
    print(
        "| method | mode | peak RSS | runtime | floor (sources + live) | peak / floor | (peak − runtime) / floor "
        "| plan / floor | s per candidate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for mode in ("fast", "lean"):
            command = [sys.executable, __file__, "--device", args.device, "--child", method, mode, str(root)]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            peak, floor, runtime = result["peak"], result["floor"], result["runtime"]
            print(
                f"| {method} | {mode} | {peak / 1e9:.2f} GB | {runtime / 1e9:.2f} GB | {floor / 1e9:.2f} GB "
                f"| {peak / floor:.2f}× | {(peak - runtime) / floor:.2f}× "
                f"| {result['planned'] / floor:.2f}× | {result['seconds']:.2f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
