"""Per-candidate evaluation time: the Evaluator (lm-eval) vs a plain batched teacher-forcing floor.

    .venv/bin/python experiments/bench_eval.py [--sizes test,demo] [--repeats 5] [--batch-size 64]
                                               [--threads 1] [--profile]

For each toy family it scores the base and every child in turn on all search tasks (every item), overwriting
the weights of one live model in place between candidates as the search does, and prints the median seconds
per candidate of:
  (floor) the same items tokenized and padded once (longest first), one forward per batch, argmax check;
  (ours)  `Evaluator.evaluate` on `hf_lm` (requests built once, tokenization cached);
  (raw)   `lm_eval.evaluator.evaluate` as lm-eval runs it on loaded task objects (requests rebuilt per call);
with their ratios to the floor, and the family's build time (its manifest's timings). All three must agree
on every item's score, or the script fails. --profile prints where one call of (ours) and (raw) spends time.
"""

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalConfig, Evaluator, TaskSpec, hf_lm
from evaluators.toy_family import build_family
from evaluators.toy_family.tasks import read_items
from evaluators.toy_family.training import IGNORE, collate


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="test,demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
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


if __name__ == "__main__":
    main()
