"""Build (or fetch from the cache) a toy family: a base, one full fine-tune per skill, lm-eval tasks.

Layout of a family root: `base/`, `<skill>/` (HF checkpoints with the tokenizer), `tasks/`, `manifest.json`.
A family is built in a temporary sibling directory and renamed into place, so an interrupted build leaves
nothing half-written; the cache key covers every parameter that changes the weights or the splits.
"""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from evaluators.toy_family.children import train_children, usable_cores, worker_pool
from evaluators.toy_family.scoring import accuracy
from evaluators.toy_family.skills import COPY, SKILLS, Skill
from evaluators.toy_family.splits import make_splits, training_stream
from evaluators.toy_family.tasks import SPLITS, read_items, task_name, write_tasks
from evaluators.toy_family.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer
from evaluators.toy_family.training import (
    Architecture,
    OnProgress,
    TrainRecipe,
    new_model,
    silent,
    torch_threads,
    train,
)
from merge_core.errors import InputError

# Bump when anything that changes built families (skills, data mix, training loop) changes: old caches go stale.
FAMILY_FORMAT = 2  # 2: generative tasks beside the log-likelihood ones
DEFAULT_SKILLS = ("rev", "srt", "cae")
# A worker process costs ~5 s of CPU to start (importing torch and transformers; 10 s wall on a busy machine),
# hidden while the base trains when it trains this long (20-70 ms a step): below it the children train here.
MIN_BASE_STEPS_FOR_WORKERS = 1000
# One thread per process: these models gain from two only on an idle machine (1.4x), and on a shared 2-core
# machine two threads spinning at every OpenMP barrier made a training step 2-18x slower (RESULTS.md). A fixed
# count also keeps the float reductions, hence the weights, identical from run to run. More cores go to the
# children, one process each.
THREADS = 1


@dataclass(frozen=True)
class FamilySize:
    architecture: Architecture
    base: TrainRecipe
    child: TrainRecipe
    n_search: int = 200
    n_test: int = 200


SIZES: dict[str, FamilySize] = {
    # The "xs" model. Its children learn at 3e-4 (at 1e-4 the gains were within noise for 2 of 3 seeds);
    # merges of this family do not beat its best parent: it is for fast tests, not for showing merging off.
    "test": FamilySize(
        Architecture(hidden=64, layers=2, heads=2, ffn=128),
        base=TrainRecipe(steps=3000, lr=2e-3, weight_decay=0.01, warmup=150),
        child=TrainRecipe(steps=300, lr=3e-4, weight_decay=0.0, warmup=30),
    ),
    # The notes' "s-D3" regime: merges tuned on the search split beat every parent on the test split. Three
    # heads of 32 (not four of 24): vLLM's CPU attention serves head sizes 32, 64, 80, ... only, and the same
    # family must serve both backends. The weight shapes (hence the parameter count and speed) are the same.
    "demo": FamilySize(
        Architecture(hidden=96, layers=3, heads=3, ffn=192),
        base=TrainRecipe(steps=3000, lr=2e-3, weight_decay=0.01, warmup=150),
        child=TrainRecipe(steps=300, lr=1e-4, weight_decay=0.0, warmup=30),
    ),
    # For layer-path (data-flow) search, which needs depth to choose from: six layers at the test width, so
    # it builds in about the demo's time. The demo's child learning rate (merges gain there).
    "deep": FamilySize(
        Architecture(hidden=64, layers=6, heads=2, ffn=128),
        base=TrainRecipe(steps=3000, lr=2e-3, weight_decay=0.01, warmup=150),
        child=TrainRecipe(steps=300, lr=1e-4, weight_decay=0.0, warmup=30),
    ),
}


@dataclass(frozen=True)
class Family:
    root: Path
    base: Path
    children: dict[str, Path]
    tasks_dir: Path
    search_tasks: dict[str, str]
    test_tasks: dict[str, str]
    manifest: dict

    def __str__(self) -> str:
        m, skills = self.manifest, list(self.children)
        header = f"{'model':<6}" + "".join(f"{f'{s}/{split}':>12}" for split in SPLITS for s in skills)
        rows = [f"toy family '{m['size']}' ({', '.join(skills)}; seed {m['seed']}) at {self.root}", header]
        for model, scores in m["scores"].items():
            rows.append(f"{model:<6}" + "".join(f"{scores[split][s]:>12.3f}" for split in SPLITS for s in skills))
        return "\n".join(rows)


def load_family(root: Path) -> Family:
    """The family whose manifest is in `root`."""
    root = Path(root).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    skills = manifest["skills"]
    return Family(
        root=root,
        base=root / "base",
        children={s: root / s for s in skills},
        tasks_dir=root / "tasks",
        search_tasks={s: task_name(s, "search") for s in skills},
        test_tasks={s: task_name(s, "test") for s in skills},
        manifest=manifest,
    )


def build_family(
    out_dir: Path | None = None,
    *,
    size: str = "test",
    skills: Sequence[str] = DEFAULT_SKILLS,
    seed: int = 0,
    split_seed: int = 1234,
    cache_dir: Path | None = None,
    on_progress: OnProgress = silent,
    workers: int | None = None,
) -> Family:
    """The toy family for these parameters: from `out_dir` or the cache when built before, else trained now.

    With `out_dir` the family ends up there (copied from the cache); otherwise it lives in the cache.
    A build reports each model's training steps, then the scoring, to `on_progress`. It trains the children in
    `workers` processes (default: one per child as the cores allow, when the base trains long enough to hide
    their start-up; 1: in this process, one after another). Workers are 'spawn' processes: a script that calls
    this needs the usual `if __name__ == "__main__":` guard.
    Neither is a parameter of the family: the weights are the same, and both stay out of the cache key.
    Raises ValueError with one line for an unknown size or skill, or an `out_dir` holding something else.
    """
    skills = _check_skills(skills)
    if size not in SIZES:
        raise InputError("toy family", "size", f"expected one of {', '.join(SIZES)}, got {size!r}")
    params = {
        "format": FAMILY_FORMAT,
        "size": size,
        "recipe": dataclasses.asdict(SIZES[size]),
        "skills": list(skills),
        "base_mix": {skill.name: share for skill, share in _base_mix(skills)},
        "seed": seed,
        "split_seed": split_seed,
        "threads": THREADS,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    if out_dir is not None and _holds_family(Path(out_dir), key):
        return load_family(Path(out_dir))
    if out_dir is not None and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise InputError(out_dir, None, "expected an empty directory or a toy family built with these parameters")

    cached = Path(cache_dir or default_cache_dir()).resolve() / key
    if not _holds_family(cached, key):
        workers = workers or default_workers(SIZES[size], len(skills))
        _place(cached, lambda tmp: _train_family(tmp, cached, params, key, on_progress, workers))
    if out_dir is None:
        return load_family(cached)
    final = Path(out_dir).resolve()
    _place(final, lambda tmp: _copy_family(cached, tmp, final))
    return load_family(final)


def _check_skills(skills: Sequence[str]) -> tuple[str, ...]:
    names = [s.strip() for s in skills.split(",")] if isinstance(skills, str) else list(skills)
    unknown = [s for s in names if s not in SKILLS]
    if unknown:
        raise InputError("toy family", "skills", f"expected some of {', '.join(SKILLS)}, got {unknown[0]!r}")
    if len(set(names)) != len(names) or not 2 <= len(names) <= 4:
        raise InputError("toy family", "skills", f"expected 2 to 4 distinct names, got {','.join(names)}")
    return tuple(s for s in SKILLS if s in names)  # registry order: the same set gives the same family


def default_cache_dir() -> Path:
    root = os.environ.get("EVOMERGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "evomerge") / "toy-family"


def _holds_family(root: Path, key: str) -> bool:
    try:
        return json.loads((root / "manifest.json").read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def _place(final: Path, fill) -> None:
    """Run fill(tmp) on a fresh sibling of `final`, then rename it into place (all or nothing)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        try:
            tmp.rename(final)
        except OSError:
            # Another process placed the same family first: theirs is as good as ours.
            if not (final / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_family(source: Path, tmp: Path, final: Path) -> None:
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("tasks"))
    manifest = json.loads((source / "manifest.json").read_text())
    splits = {s: {split: read_items(source / "tasks", s, split) for split in SPLITS} for s in manifest["skills"]}
    write_tasks(tmp / "tasks", splits, final / "tasks")  # the task YAMLs name their data by absolute path


def default_workers(size: FamilySize, children: int) -> int:
    if size.base.steps < MIN_BASE_STEPS_FOR_WORKERS:
        return 1
    return min(children, usable_cores())


def train_models(
    size: FamilySize,
    skills: Sequence[str],
    seed: int,
    held_out: frozenset[str],
    on_progress: OnProgress = silent,
    workers: int = 1,
) -> tuple[dict[str, LlamaForCausalLM], dict[str, list[float]], dict[str, float]]:
    """The base and one child per skill, with each one's step losses and seconds (no files written).

    The children train in `workers` processes (1: here, one after another), with the same weights either way.
    """
    with worker_pool(workers) as pool:  # started first: its processes import torch while the base trains
        started = time.perf_counter()
        base = new_model(size.architecture, seed)
        stream = training_stream(_base_mix(skills), held_out, random.Random(f"{seed}:base"))
        losses = {"base": train(base, stream, size.base, partial(on_progress, "training base"))}
        timings = {"base": time.perf_counter() - started}
        children = train_children(pool, base, size.child, skills, seed, held_out, on_progress)
    models = {"base": base}
    for skill, (model, child_losses, seconds) in children.items():
        models[skill], losses[skill], timings[skill] = model, child_losses, seconds
    return models, losses, timings


def _base_mix(skills: Sequence[str]) -> list[tuple[Skill, float]]:
    return [(COPY, COPY.base_share), *((SKILLS[s], SKILLS[s].base_share) for s in skills)]


def _train_family(tmp: Path, final: Path, params: dict, key: str, on_progress: OnProgress, workers: int) -> None:
    size, skills = SIZES[params["size"]], params["skills"]
    splits = {
        s: make_splits(SKILLS[s], n_search=size.n_search, n_test=size.n_test, split_seed=params["split_seed"])
        for s in skills
    }
    held_out = frozenset(p for by_split in splits.values() for items in by_split.values() for p, _ in items)
    with torch_threads(THREADS):
        models, losses, timings = train_models(size, skills, params["seed"], held_out, on_progress, workers)
        scores = {}
        for done, (name, model) in enumerate(models.items(), 1):
            scores[name] = {split: {s: accuracy(model, splits[s][split]) for s in skills} for split in SPLITS}
            on_progress("scoring", done, len(models))
    for name, model in models.items():
        _save_checkpoint(model, tmp / name)
    write_tasks(tmp / "tasks", splits, final / "tasks")
    manifest = {
        "key": key,
        **params,
        "parameters": sum(p.numel() for p in models["base"].parameters()),
        "torch": torch.__version__,
        "timings_s": {name: round(t, 2) for name, t in timings.items()},
        "workers": workers,  # children trained side by side: their timings overlap
        "final_loss": {name: round(sum(loss[-20:]) / len(loss[-20:]), 4) for name, loss in losses.items()},
        "scores": scores,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _save_checkpoint(model: LlamaForCausalLM, directory: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=16
    )
    model.save_pretrained(directory)
    save_tokenizer(directory)
