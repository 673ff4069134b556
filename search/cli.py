"""The `evomerge` command line.

Bad input (merge_core.errors.InputError, or a file that is not there) ends as one line on stderr and exit code
2. Anything else is evomerge's own bug: exit 1 and one line that says so (EVOMERGE_DEBUG=1 shows the traceback).
"""

import argparse
import os
import sys
from pathlib import Path

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1


def cmd_merge(args: argparse.Namespace) -> None:
    from merge_core import MergeSession, Recipe

    recipe = Recipe.from_yaml(Path(args.recipe))
    # One merge: read each input tensor when it is merged instead of loading every source whole first.
    session = MergeSession(recipe.model_refs(), device=args.device, out_of_core=True)
    out = session.write(recipe, args.out_dir, seed=args.seed, shard_bytes=int(args.shard_size * 1024**2))
    print(f"wrote {out}")


def cmd_moe(args: argparse.Namespace) -> None:
    from merge_core.moe import build_moe
    from merge_core.moe_config import MoEConfig

    config = MoEConfig.from_yaml(Path(args.config))
    out = build_moe(
        config,
        args.out_dir,
        device=args.device,
        seed=args.seed,
        allow_all_same=args.i_understand_this_is_not_useful_without_training,
        shard_bytes=int(args.shard_size * 1024**2),
    )
    print(f"wrote {out}")


def cmd_toy_family(args: argparse.Namespace) -> None:
    from evaluators.toy_family import build_family
    from search.progress import Progress

    skills = [s.strip() for s in args.skills.split(",")] if args.skills else None
    options = {"skills": skills} if skills else {}
    with Progress() as progress:
        family = build_family(
            Path(args.out_dir), size=args.size, seed=args.seed, on_progress=progress.stages("toy family"), **options
        )
    print(family)


def cmd_run(args: argparse.Namespace) -> None:
    from search.runner import run_search

    run_search(Path(args.config), resume=args.resume)


def cmd_plan(args: argparse.Namespace) -> None:
    from search.plan import plan_search

    print(plan_search(Path(args.config)))


def cmd_export(args: argparse.Namespace) -> None:
    from search.results.export import export_recipe
    from search.run_dir import write_atomically

    text = export_recipe(Path(args.run_dir), objective=args.objective, rank=args.rank, evolved=args.evolved)
    if args.out is None:
        print(text, end="")
        return
    write_atomically(Path(args.out), text)
    print(f"wrote {args.out}")


def cmd_ui(args: argparse.Namespace) -> None:
    from functools import partial

    from search.results.dashboard import serve

    serve(Path(args.run_dir), port=args.port, optuna=args.optuna, say=partial(print, flush=True))


def cmd_demo(args: argparse.Namespace) -> None:
    from search.demo import run_demo

    run_demo(Path(args.out), size=args.size, trials=args.trials, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge models from a mergekit YAML recipe into OUT_DIR")
    merge.add_argument("recipe", help="mergekit-compatible recipe (YAML)")
    merge.add_argument("out_dir", help="output checkpoint directory (written atomically)")
    merge.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    merge.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA)")
    merge.add_argument("--shard-size", type=float, default=5120, help="max shard size in MiB (default 5120)")
    merge.set_defaults(run=cmd_merge)

    moe = commands.add_parser("moe", help="build a Mixtral Mixture of Experts from a mergekit-moe config into OUT_DIR")
    moe.add_argument("config", help="mergekit-moe config (YAML)")
    moe.add_argument("out_dir", help="output checkpoint directory (written atomically)")
    moe.add_argument("--device", default="cpu", help="where gate_mode hidden runs the base model (default: cpu)")
    moe.add_argument("--seed", type=int, default=0, help="seed for random gates and noise_scale (default 0)")
    moe.add_argument("--shard-size", type=float, default=5120, help="max shard size in MiB (default 5120)")
    moe.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        action="store_true",
        help="build even when every expert is the same model (as mergekit-moe's flag)",
    )
    moe.set_defaults(run=cmd_moe)

    run = commands.add_parser("run", help="run the merge-recipe search a search.yml describes")
    run.add_argument("config", help="search config (YAML)")
    run.add_argument("--resume", action="store_true", help="continue the search in the config's output_dir")
    run.set_defaults(run=cmd_run)

    plan = commands.add_parser("plan", help="validate a search.yml, time one merge and one evaluation, project the run")
    plan.add_argument("config")
    plan.set_defaults(run=cmd_plan)

    export = commands.add_parser(
        "export", help="write a finished search's recommended recipe, or a front member, as mergekit YAML"
    )
    export.add_argument("run_dir")
    export.add_argument("--out", help="file to write (default: standard output)")
    pick = export.add_mutually_exclusive_group()
    pick.add_argument("--objective", help="the front member best on this objective")
    pick.add_argument("--rank", type=int, help="the K-th front member by mean search score (1 = best)")
    pick.add_argument(
        "--evolved", action="store_true", help="the best evolved recipe, even where the gate chose a reference instead"
    )
    export.set_defaults(run=cmd_export)

    ui = commands.add_parser("ui", help="serve a run's MLflow dashboard (and its Optuna study) on 127.0.0.1")
    ui.add_argument("run_dir")
    ui.add_argument("--port", type=int, default=5000, help="the MLflow UI's port (default 5000)")
    ui.add_argument(
        "--optuna", action="store_true", help="also serve the run's Optuna study with optuna-dashboard on PORT+1"
    )
    ui.set_defaults(run=cmd_ui)

    demo = commands.add_parser("demo", help="build the demo toy family, run a short search, export the best recipe")
    demo.add_argument("--out", default="evomerge-demo", help="demo directory (default: ./evomerge-demo)")
    demo.add_argument("--size", default="demo", choices=["test", "demo"], help="toy family size (default: demo)")
    demo.add_argument("--trials", type=int, help="search this many trials instead of configs/demo.yml's 60")
    demo.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm"],
        help="score candidates in memory with HF (default) or in vLLM",
    )
    demo.set_defaults(run=cmd_demo)

    toy = commands.add_parser("toy-family", help="build the tiny char-level Llama family used by tests and demo")
    toy.add_argument("out_dir")
    toy.add_argument("--size", default="test", choices=["test", "demo", "deep"])
    toy.add_argument("--skills", help="comma-separated skill names (2-4)")
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(run=cmd_toy_family)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow 3 would otherwise send usage telemetry, and Ray its usage stats: a search stays on this machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Per-file progress bars (datasets loading each task split, hub writes) would bury the search's own progress.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("EVOMERGE_DEBUG"):
            raise
        from merge_core.errors import InputError

        one_line = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, InputError | FileNotFoundError):
            print(f"evomerge: error: {one_line}", file=sys.stderr)
            return USER_ERROR_EXIT
        print(
            f"evomerge: internal error: {type(err).__name__}: {one_line} (EVOMERGE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
