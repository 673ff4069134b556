"""Fine-tune one child per skill from a trained base: one after another here, or at once in worker processes.

Children are independent once the base is trained, so a build can train them side by side. Each worker is a
'spawn' process (a fresh interpreter: no forked copy of the parent's threads and locks) running the same
`train_child` with the parent's torch thread count, so every child's weights are bit-identical to the serial
build's. Workers relay each training step through a queue; only the parent calls `on_progress`.
"""

import copy
import io
import multiprocessing
import os
import queue
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.queues import Queue

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evaluators.toy_family.skills import SKILLS
from evaluators.toy_family.splits import training_stream
from evaluators.toy_family.training import OnProgress, TrainRecipe, train

Trained = tuple[LlamaForCausalLM, list[float], float]  # (model, step losses, seconds)

_steps: Queue | None = None  # in a worker: its line to the parent, for (stage, done, total) of each step


@dataclass(frozen=True)
class WorkerPool:
    executor: ProcessPoolExecutor
    steps: Queue


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool | None]:
    """`workers` processes for the children, started now so that they import torch while the base trains.

    None for one worker: the children then train in this process. Workers use this process's torch thread count.
    """
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    steps = context.Queue()
    init = (steps, torch.get_num_threads())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init) as executor:
        for _ in range(workers):
            executor.submit(os.getpid)  # the pool spawns a process per submit while none is idle: all start now
        yield WorkerPool(executor, steps)


def train_child(
    base: LlamaForCausalLM,
    recipe: TrainRecipe,
    skill: str,
    seed: int,
    held_out: frozenset[str],
    on_step: Callable[[int, int], None],
) -> Trained:
    """A full fine-tune of a copy of `base` on one skill: the same steps wherever it runs."""
    started = time.perf_counter()
    model = copy.deepcopy(base)
    stream = training_stream([(SKILLS[skill], 1.0)], held_out, random.Random(f"{seed}:{skill}"))
    losses = train(model, stream, recipe, on_step)
    return model, losses, time.perf_counter() - started


def train_children(
    pool: WorkerPool | None,
    base: LlamaForCausalLM,
    recipe: TrainRecipe,
    skills: Sequence[str],
    seed: int,
    held_out: frozenset[str],
    on_progress: OnProgress,
) -> dict[str, Trained]:
    """Each skill's child of `base`, in skill order; in `pool`'s workers when there is one."""
    if pool is None:
        return {s: train_child(base, recipe, s, seed, held_out, partial(on_progress, f"training {s}")) for s in skills}
    state = _dumps(base.state_dict())
    futures = {s: pool.executor.submit(_train_in_worker, base.config, state, recipe, s, seed, held_out) for s in skills}
    _relay(pool.steps, futures, recipe.steps, on_progress)
    trained = {}
    for skill, future in futures.items():
        child_state, losses, seconds = future.result()
        model = copy.deepcopy(base)
        model.load_state_dict(_loads(child_state))
        trained[skill] = model.eval(), losses, seconds
    return trained


def _init_worker(steps: Queue, threads: int) -> None:
    global _steps
    _steps = steps
    torch.set_num_threads(threads)  # the parent's count: the same float reductions, hence the same weights


def _train_in_worker(
    config: LlamaConfig, base_state: bytes, recipe: TrainRecipe, skill: str, seed: int, held_out: frozenset[str]
) -> tuple[bytes, list[float], float]:
    base = LlamaForCausalLM(config)  # the parent's config, attention implementation included
    base.load_state_dict(_loads(base_state))
    model, losses, seconds = train_child(base, recipe, skill, seed, held_out, partial(_send_step, f"training {skill}"))
    return _dumps(model.state_dict()), losses, seconds


def _send_step(stage: str, done: int, total: int) -> None:
    _steps.put((stage, done, total))


def _relay(steps: Queue, futures: dict[str, Future], per_child: int, on_progress: OnProgress) -> None:
    """Pass every worker step to on_progress, until all have come.

    A child's steps are held back until every child before it has started, so that a display lists the
    children in skill order whichever worker happens to report first.
    """
    stages = [f"training {s}" for s in futures]
    held: dict[str, list[tuple[int, int]]] = {stage: [] for stage in stages}
    started = 0  # stages[:started] have started: their steps go straight through
    for _ in range(len(stages) * per_child):
        stage, done, total = _next_step(steps, futures)
        held[stage].append((done, total))
        while started < len(stages) and held[stages[started]]:
            started += 1
        for name in stages[:started]:
            for call in held[name]:
                on_progress(name, *call)
            held[name].clear()


def _next_step(steps: Queue, futures: dict[str, Future]) -> tuple[str, int, int]:
    while True:
        try:
            return steps.get(timeout=1.0)
        except queue.Empty:
            for future in futures.values():
                if future.done():
                    future.result()  # a failed or killed worker raises here instead of leaving us waiting


def _dumps(state: dict[str, torch.Tensor]) -> bytes:
    # Bytes, not tensors, cross the process boundary: no shared-memory file handles to run out of or leak.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)
