"""Merge speed: mergekit's run_merge vs `evomerge merge` vs MergeSession.materialize vs a memory-copy floor.

    .venv/bin/python experiments/bench_merge.py [--sizes 0.2M,25M,100M] [--methods ...] [--device cpu|cuda]
    .venv/bin/python experiments/bench_merge.py --cli --sizes 1B [--methods ...]

Families are random Llamas (base + 3 children = base + small deltas) written as real safetensors checkpoints.
For each size and method it times, in one run and on the same files:
  (a) mergekit 0.1.5 `run_merge` in process, warm (its second call),
  (b) `evomerge merge` to disk (sources loaded, merged, written),
  (c) `MergeSession.materialize` with resident sources (warm: after one call that prepared the inputs),
  (floor) copying every input tensor's bytes once into preallocated memory.
and prints a table with the ratios (a)/(c) and (c)/floor.

--cli: the two command lines as a user runs them, process start included, each in its own process under
/usr/bin/time: `mergekit-yaml` against `evomerge merge` (out of core: each input tensor read from its
memory-mapped file when merged), wall seconds and peak RSS, and their ratios.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from merge_core import MergeSession, Recipe

SIZES = {  # name -> (hidden, layers, ffn, vocab); parameter counts are printed
    "0.2M": (64, 4, 128, 256),
    "25M": (512, 6, 1536, 4000),
    "100M": (768, 12, 2048, 10000),
    "270M": (1024, 16, 2816, 32000),  # bench_memory.py's default
    "1B": (2048, 16, 5632, 32000),  # 0.97B parameters, 3.9 GB a model in float32
}
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]


def build_family(root: Path, size: str, children: int = 3) -> list[str]:
    hidden, layers, ffn, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        vocab_size=vocab,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = [str(root / "base")]
    base.save_pretrained(paths[0])
    for i in range(children):
        with torch.no_grad():
            child = {n: p + 0.01 * torch.randn_like(p) for n, p in base.state_dict().items()}
        model = LlamaForCausalLM(config)
        model.load_state_dict(child, strict=False)
        paths.append(str(root / f"child{i}"))
        model.save_pretrained(paths[-1])
    return paths


def recipe_text(method: str, paths: list[str]) -> str:
    base, children = paths[0], paths[1:]
    if method == "slerp":
        models = [{"model": base}, {"model": children[0]}]
        return yaml.safe_dump({"merge_method": "slerp", "base_model": base, "models": models, "parameters": {"t": 0.4}})
    params = {"weight": 0.5}
    if method in ("ties", "dare_ties"):
        params["density"] = 0.5
    config = {"merge_method": method, "models": [{"model": c, "parameters": params} for c in children]}
    if method != "linear":
        config["base_model"] = base
    return yaml.safe_dump(config)


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mergekit_seconds(text: str, out: Path) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False, random_seed=0)
    run_merge(config, str(out), options)  # cold: imports, caches
    return timed(lambda: run_merge(config, str(out), options), repeat=1)


def floor_seconds(session: MergeSession, recipe: Recipe) -> float:
    plan = session.plan(recipe)
    sources = [session.checkpoints[ref].tensors[name] for job in plan.jobs for ref, name in job.sources]
    buffers = [torch.empty_like(t) for t in sources]
    return timed(lambda: [b.copy_(s) for b, s in zip(buffers, sources, strict=True)])


def measure(session: MergeSession, text: str, root: Path, device: str) -> tuple[float, float, float, float]:
    recipe = Recipe.from_yaml(text)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    mergekit = mergekit_seconds(text, root / "mk") if device == "cpu" else float("nan")
    to_disk = timed(lambda: MergeSession(recipe.model_refs(), device=device).write(recipe, root / "ev"), repeat=1)
    session.materialize(recipe)  # prepares once, as a search does before its first candidate
    in_memory = timed(lambda: (session.materialize(recipe), sync()))
    return mergekit, to_disk, in_memory, floor_seconds(session, recipe)


def run_timed(command: list) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB, GNU time's %M) and peak anonymous RSS (GB: RssAnon sampled every 20 ms from
    /proc: what the process holds itself, without the mapped file pages that RSS also counts) of one command."""
    process = subprocess.Popen(
        ["/usr/bin/time", "-f", "%e %M", *map(str, command)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    anon = 0
    while process.poll() is None:
        anon = max(anon, _anon_kilobytes(process.pid))
        time.sleep(0.02)
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"{command[0]} failed:\n{stderr[-2000:]}")
    seconds, kilobytes = stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kilobytes) / 1024**2, anon / 1024**2


def _anon_kilobytes(time_pid: int) -> int:
    """RssAnon of the command GNU time runs (its child), 0 once it is gone."""
    try:
        child = Path(f"/proc/{time_pid}/task/{time_pid}/children").read_text().split()[0]
        status = Path(f"/proc/{child}/status").read_text()
    except (OSError, IndexError):
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)


def compare_clis(root: Path, paths: list[str], methods: list[str]) -> None:
    """mergekit-yaml vs evomerge merge per method; each output is removed before the next command."""
    bin_dir = Path(sys.executable).parent
    print(
        f"{'method':>16} {'mergekit-yaml':>14} {'evomerge merge':>15} {'speedup':>8} {'mk RSS':>8} {'ev RSS':>8} "
        f"{'mk anon':>8} {'ev anon':>8}"
    )
    for method in methods:
        recipe = root / f"{method}.yml"
        recipe.write_text(recipe_text(method, paths))
        mk = run_timed([bin_dir / "mergekit-yaml", recipe, root / "out", "--random-seed", "0", "--no-copy-tokenizer"])
        shutil.rmtree(root / "out", ignore_errors=True)
        ev = run_timed([bin_dir / "evomerge", "merge", recipe, root / "out", "--seed", "0"])
        shutil.rmtree(root / "out", ignore_errors=True)
        print(
            f"{method:>16} {mk[0]:>13.1f}s {ev[0]:>14.1f}s {mk[0] / ev[0]:>7.2f}x {mk[1]:>6.2f}GB {ev[1]:>6.2f}GB "
            f"{mk[2]:>6.2f}GB {ev[2]:>6.2f}GB",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cli", action="store_true", help="time the command lines (process start, peak RSS)")
    args = parser.parse_args()
    if args.cli:
        for size in args.sizes.split(","):
            root = Path(tempfile.mkdtemp(prefix=f"bench-cli-{size}-"))
            try:
                print(f"size {size}, 4 models (base + 3 children), float32, torch threads {torch.get_num_threads()}")
                compare_clis(root, build_family(root, size), args.methods.split(","))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(
        f"{'size':>6} {'params':>8} {'method':>16} {'mergekit':>9} {'ev merge':>9} {'materialize':>11} "
        f"{'floor':>8} {'mk/mat':>8} {'mat/floor':>9}"
    )
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-{size}-"))
        try:
            paths = build_family(root, size)
            session = MergeSession(paths, device=args.device)
            params = sum(t.numel() for t in session.checkpoints[paths[0]].tensors.values())
            for method in args.methods.split(","):
                mk, ev, mat, floor = measure(session, recipe_text(method, paths), root, args.device)
                print(
                    f"{size:>6} {params / 1e6:>7.2f}M {method:>16} {mk:>8.3f}s {ev:>8.3f}s {mat:>10.4f}s "
                    f"{floor:>7.4f}s {mk / mat:>7.1f}x {mat / floor:>8.2f}x",
                    flush=True,
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
