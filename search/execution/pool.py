"""An asynchronous pool of Ray actors that nothing a single task does can bring down.

Each actor builds its worker once with `factory()` (where a real worker loads its models) and then serves
`worker.run(payload)` calls one at a time. The pool hands a worker a new task as soon as it is free, so a
straggler never idles the others, and turns every way a task can go wrong into a failed `Outcome`:
- `run` raises: the error is recorded and the same worker keeps serving;
- `run` exceeds `trial_timeout_s`: the actor is killed and a fresh one (a new `factory()`) takes its place;
- the worker process dies (os._exit, segfault, OOM kill): recorded as a crash, the actor is replaced;
- the worker's NODE dies (a cluster machine lost): not the task's doing, so it is no outcome at all: the task
  goes back to the front of the queue and runs again on a worker that starts on a node still alive.
Only a factory that cannot start is fatal: a worker whose start fails twice in a row is retired, and once every
worker is retired the pool raises `WorkerStartError` with the factory's error. `factory()` itself has no time
limit (loading models may take long); `trial_timeout_s` clocks only `run`.

With `worker_log`, each actor appends its stdout and stderr (the file descriptors, so C code and tqdm too) to
that file before it builds its worker: lm-eval's bars and warnings land there, not on the driver's terminal.

Typical loop:  `for _ in range(pool.idle()): pool.submit(key, payload)` then `outcomes = pool.wait()`.
"""

import logging
import os
import re
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.exceptions import RayError, RayTaskError

logger = logging.getLogger(__name__)

MAX_START_FAILURES = 2  # consecutive failed starts after which a worker slot is retired
POLL_S = 5.0  # the longest single ray.wait, so no call into Ray can block forever
GET_TIMEOUT_S = 60.0  # fetching a result ray.wait already reported ready
NODE_DEATH_GRACE_S = 40.0  # how long a dead actor's node may still show alive (Ray's health checks: ~30 s)


class Worker(Protocol):
    def run(self, payload: Any) -> Any: ...


@dataclass(frozen=True)
class Outcome:
    """How one submitted task ended. `error` is one line; `worker` names the slot and its process."""

    key: int
    ok: bool
    value: Any
    error: str | None
    seconds: float
    worker: str
    node: str = ""  # the Ray node id it ran on


class WorkerStartError(RuntimeError):
    """The worker factory failed on every worker: the pool cannot run anything."""


class StartFailed(RuntimeError):
    """A factory error reduced to its one-line text. Ray must bring the error back to the driver, and an
    exception type the driver cannot rebuild arrives as 'Failed to deserialize exception'; this one always can."""


def one_line(err: BaseException) -> str:
    """'ExceptionType: message' on a single line."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def crash_reason(err: RayError) -> str:
    """The informative part of Ray's many-line message about a dead actor."""
    if getattr(err, "actor_init_failed", False):
        # Ray keeps only the text of an error raised while creating the actor: its last 'Type: message' line.
        raised = [line.strip() for line in str(err).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
        if raised:
            return raised[-1]
    text = " ".join(str(err).split())
    detail = re.search(r"Worker exit detail: (.*?\.)(?: |$)", text)
    if detail:
        return detail.group(1)
    first_sentence = re.match(r"(.*?\.)(?: |$)", text)
    return first_sentence.group(1) if first_sentence else text or type(err).__name__


def node_lost(err: RayError, node: str = "") -> bool:
    """Did the actor die because its node did? Ray says so in the death message when it knows (the node's
    raylet reported gone); else the node it ran on is asked after: a dead node shows in ray.nodes() within
    Ray's health-check period, so a cluster (more than one node) is polled that long. A single node cannot be
    lost without the driver's Ray going with it."""
    if "node has died" in str(err) or "node died" in str(err):
        return True
    nodes = ray.nodes()
    if not node or len(nodes) < 2:
        return False
    deadline = time.monotonic() + NODE_DEATH_GRACE_S
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if node not in alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def task_cause(err: RayTaskError) -> BaseException:
    """The exception raised inside the actor, when Ray could bring it back."""
    return err.cause if isinstance(err.cause, BaseException) else err


class WorkerHost:
    """Lives in the Ray actor process: builds the worker once, then runs payloads through it."""

    def __init__(self, factory: Callable[[], Worker], log: Path | None):
        self.factory, self.log = factory, log
        self.worker: Worker | None = None

    def start(self) -> tuple[str, str]:
        """Where it runs: host:pid, and the Ray node id."""
        if self.log is not None:
            redirect_output(self.log)
        try:
            self.worker = self.factory()
        except Exception as err:
            traceback.print_exc()
            raise StartFailed(one_line(err)) from None
        return f"{socket.gethostname()}:{os.getpid()}", ray.get_runtime_context().get_node_id()

    def run(self, payload: Any) -> tuple[bool, Any, float]:
        began = time.perf_counter()
        try:
            value = self.worker.run(payload)
        except Exception as err:
            traceback.print_exc()  # the full trace goes to the worker's log; the outcome keeps one line
            return False, one_line(err), time.perf_counter() - began
        return True, value, time.perf_counter() - began


def redirect_output(log: Path) -> None:
    """Point this process's file descriptors 1 and 2 at the end of `log` (shared by every worker: append mode)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Line by line: an actor is killed at shutdown (or on a timeout), and a full buffer would die with it.
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


@dataclass
class Task:
    key: int
    payload: Any
    ref: ray.ObjectRef | None = None
    began: float = 0.0


@dataclass
class Slot:
    """One worker position in the pool; its actor is replaced whenever it dies or hangs."""

    index: int
    name: str = ""
    node: str = ""  # the Ray node id its actor runs on, once started
    actor: Any = None
    start_ref: ray.ObjectRef | None = None  # set while the actor runs factory()
    task: Task | None = None
    start_failures: int = 0
    retired: bool = False

    @property
    def ready(self) -> bool:
        return self.actor is not None and self.start_ref is None and self.task is None

    def watched_ref(self) -> ray.ObjectRef | None:
        """What this slot is waiting on: its start, or its running task."""
        if self.start_ref is not None:
            return self.start_ref
        return self.task.ref if self.task is not None else None


class WorkerPool:
    """`workers` Ray actors of `num_cpus`/`num_gpus` each, serving submitted payloads asynchronously."""

    def __init__(
        self,
        factory: Callable[[], Worker],
        workers: int,
        num_cpus: float,
        num_gpus: float,
        trial_timeout_s: float | None,
        worker_log: Path | None = None,
    ):
        if workers < 1:
            raise ValueError(f"WorkerPool: workers must be >= 1, got {workers}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError(f"WorkerPool: num_cpus and num_gpus must be >= 0, got {num_cpus} and {num_gpus}")
        if trial_timeout_s is not None and trial_timeout_s <= 0:
            raise ValueError(f"WorkerPool: trial_timeout_s must be > 0 or None, got {trial_timeout_s}")
        if not ray.is_initialized():
            # ray would otherwise start itself on first use, listening on every interface.
            raise RuntimeError("WorkerPool: Ray is not running; call search.ray_runtime.start_ray() first")
        cluster = ray.cluster_resources()
        for resource, each in (("CPU", num_cpus), ("GPU", num_gpus)):
            if workers * each > cluster.get(resource, 0) + 1e-9:
                raise ValueError(
                    f"WorkerPool: {workers} workers x {each:g} {resource} need {workers * each:g} {resource}s "
                    f"but the Ray cluster has {cluster.get(resource, 0):g}: the extra workers would never start"
                )
        self.trial_timeout_s = trial_timeout_s
        self._factory, self._worker_log = factory, worker_log
        self._actor_class = ray.remote(WorkerHost).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
        )
        self._slots = [Slot(index) for index in range(workers)]
        self._queue: deque[Task] = deque()
        self._last_start_error = ""
        self._closed = False
        for slot in self._slots:
            self._launch(slot)

    def idle(self) -> int:
        """How many more tasks would start now (a worker still running factory() counts: it is reserved)."""
        free = sum(1 for slot in self._slots if not slot.retired and slot.task is None)
        return max(0, free - len(self._queue))

    def pending(self) -> int:
        """Tasks submitted whose outcome wait() has not returned yet."""
        return len(self._queue) + sum(1 for slot in self._slots if slot.task is not None)

    def submit(self, key: int, payload: Any) -> None:
        """Queue `payload` for the next free worker. Beyond idle(), tasks wait their turn in order."""
        self._raise_if_unusable()
        running = [slot.task.key for slot in self._slots if slot.task is not None]
        if key in running or any(task.key == key for task in self._queue):
            raise ValueError(f"WorkerPool.submit: key {key} is already pending")
        self._queue.append(Task(key, payload))
        self._dispatch()

    def wait(self, timeout_s: float | None = None) -> list[Outcome]:
        """Outcomes of the tasks that finished, as soon as there is one; [] at the timeout or with none pending."""
        give_up_at = None if timeout_s is None else time.monotonic() + timeout_s
        while self.pending():
            self._raise_if_unusable()
            refs = [ref for slot in self._slots if (ref := slot.watched_ref()) is not None]
            ray.wait(refs, num_returns=1, timeout=self._seconds_to_next_event(give_up_at))
            finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            outcomes = self._collect(set(finished))
            self._dispatch()
            if outcomes:
                return outcomes
            if give_up_at is not None and time.monotonic() >= give_up_at:
                break
        return []

    def shutdown(self) -> None:
        """Kill every actor and drop pending tasks. Idempotent; the pool cannot be used afterwards."""
        for slot in self._slots:
            self._kill(slot)
            slot.task = None
        self._queue.clear()
        self._closed = True

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _seconds_to_next_event(self, give_up_at: float | None) -> float:
        now = time.monotonic()
        moments = [now + POLL_S]
        if give_up_at is not None:
            moments.append(give_up_at)
        if self.trial_timeout_s is not None:
            moments += [slot.task.began + self.trial_timeout_s for slot in self._slots if slot.task is not None]
        return max(0.0, min(moments) - now)

    def _collect(self, finished: set) -> list[Outcome]:
        """Settle finished starts and tasks, and expire tasks past their deadline."""
        outcomes = []
        for slot in self._slots:
            if slot.start_ref is not None and slot.start_ref in finished:
                self._finish_start(slot)
            elif slot.task is not None and slot.task.ref in finished:
                outcome = self._finish_task(slot)
                outcomes += [outcome] if outcome is not None else []
            elif slot.task is not None and self._overdue(slot.task):
                outcomes.append(self._settle(slot, False, None, f"timed out after {self.trial_timeout_s:g} s"))
                self._replace(slot)
        return outcomes

    def _overdue(self, task: Task) -> bool:
        return self.trial_timeout_s is not None and time.monotonic() - task.began >= self.trial_timeout_s

    def _finish_start(self, slot: Slot) -> None:
        try:
            where, slot.node = ray.get(slot.start_ref, timeout=GET_TIMEOUT_S)
        except RayTaskError as err:
            cause = task_cause(err)
            self._start_failed(slot, str(cause) if isinstance(cause, StartFailed) else one_line(cause))
            return
        except RayError as err:
            if node_lost(err):
                logger.warning("%s lost its node while starting; starting it again elsewhere", slot.name)
                self._replace(slot)
                return
            self._start_failed(slot, f"worker could not start: {crash_reason(err)}")
            return
        slot.start_ref = None
        slot.start_failures = 0
        slot.name = f"worker-{slot.index} ({where})"

    def _start_failed(self, slot: Slot, error: str) -> None:
        slot.start_failures += 1
        self._last_start_error = error
        if slot.start_failures < MAX_START_FAILURES:
            logger.warning("%s failed to start (%s); starting it again", slot.name, error)
            self._replace(slot)
            return
        logger.error("%s failed to start %d times in a row (%s); retiring it", slot.name, slot.start_failures, error)
        self._kill(slot)
        slot.retired = True

    def _finish_task(self, slot: Slot) -> Outcome | None:
        """How the slot's task ended; None when its node died under it (the task is queued again, first)."""
        try:
            ok, value, seconds = ray.get(slot.task.ref, timeout=GET_TIMEOUT_S)
        except RayTaskError as err:
            # run() catches its own errors, so this is Ray failing around it (say, an unpicklable result);
            # the actor itself is fine and keeps serving.
            return self._settle(slot, False, None, one_line(task_cause(err)))
        except RayError as err:
            if node_lost(err, slot.node):
                logger.warning("%s: its node died; trial %s goes to another worker", slot.name, slot.task.key)
                self._queue.appendleft(Task(slot.task.key, slot.task.payload))
                slot.task = None
                self._replace(slot)
                return None
            outcome = self._settle(slot, False, None, f"worker crashed: {crash_reason(err)}")
            self._replace(slot)
            return outcome
        if ok:
            return self._settle(slot, True, value, None, seconds)
        return self._settle(slot, False, None, value, seconds)

    def _settle(self, slot: Slot, ok: bool, value: Any, error: str | None, seconds: float | None = None) -> Outcome:
        """Free the slot and describe how its task ended (timed by the worker when it reported back)."""
        task, slot.task = slot.task, None
        seconds = time.monotonic() - task.began if seconds is None else seconds
        return Outcome(task.key, ok, value, error, seconds, slot.name, slot.node)

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._queue:
                return
            if slot.ready:
                slot.task = self._queue.popleft()
                slot.task.ref = slot.actor.run.remote(slot.task.payload)
                slot.task.began = time.monotonic()

    def _launch(self, slot: Slot) -> None:
        slot.name, slot.node = f"worker-{slot.index}", ""
        slot.actor = self._actor_class.remote(self._factory, self._worker_log)
        slot.start_ref = slot.actor.start.remote()

    def _replace(self, slot: Slot) -> None:
        self._kill(slot)
        self._launch(slot)

    def _kill(self, slot: Slot) -> None:
        if slot.actor is not None and ray.is_initialized():
            ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.start_ref = None, None

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise RuntimeError("WorkerPool: the pool was shut down")
        if all(slot.retired for slot in self._slots):
            raise WorkerStartError(
                f"no worker could start (each of {len(self._slots)} failed {MAX_START_FAILURES} times in a row): "
                f"{self._last_start_error}"
            )
