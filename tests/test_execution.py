"""The Ray worker pool on a real local Ray: asynchronous results, and every failure leaves it at full strength."""

import ipaddress
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray import cloudpickle

from search.execution.pool import Outcome, WorkerPool, WorkerStartError
from search.execution.ray_runtime import ray_temp_dir, start_ray, stop_ray
from search.run_dir import RunDir

# Ray workers cannot import this test module: ship its factory and worker classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRIAL_TIMEOUT_S = 4.0
MEET_S = 3.0  # below TRIAL_TIMEOUT_S: a task waiting for its partner must not be timed out
WAIT_S = 60.0  # generous upper bound for one wait() on a loaded 2-core machine


class ScriptedWorker:
    """Does what the payload says: ("echo", x), ("sleep", s), ("raise", msg), ("exit", code), ("pid", s),
    ("meet", dir): wait up to MEET_S for a second task to arrive in `dir`, return (pid, whether it came)."""

    def run(self, payload):
        action, argument = payload
        if action == "echo":
            return argument
        if action == "sleep":
            time.sleep(argument)
            return argument
        if action == "raise":
            raise ValueError(argument)
        if action == "exit":
            os._exit(argument)
        if action == "pid":
            time.sleep(argument)  # long enough that two of these overlap: they must land on different workers
            return os.getpid()
        if action == "meet":
            Path(argument).mkdir(parents=True, exist_ok=True)
            (Path(argument) / str(os.getpid())).touch()
            give_up_at = time.monotonic() + MEET_S
            while len(list(Path(argument).iterdir())) < 2 and time.monotonic() < give_up_at:
                time.sleep(0.05)
            return os.getpid(), len(list(Path(argument).iterdir())) >= 2
        raise AssertionError(f"unknown action {action}")


class ScriptedFactory:
    """Builds a ScriptedWorker, appending this process's pid to `log` (one line per factory call) or failing."""

    def __init__(self, log: Path | None = None, fail: bool = False):
        self.log, self.fail = log, fail

    def __call__(self) -> ScriptedWorker:
        if self.log is not None:
            with open(self.log, "a") as file:
                file.write(f"{os.getpid()}\n")
        if self.fail:
            raise OSError("cannot load model from /nonexistent/model")
        return ScriptedWorker()


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    # A deliberately long run dir: Ray's socket paths must not grow with it.
    run_dir = tmp_path_factory.mktemp("a-run-dir-with-a-rather-long-name-" + "x" * 60)
    start_ray(None, RunDir(run_dir).ray_link, num_cpus=2)
    yield run_dir
    stop_ray()


@pytest.fixture(scope="module")
def pool(ray_session):
    with WorkerPool(ScriptedFactory(), workers=2, num_cpus=0.5, num_gpus=0, trial_timeout_s=TRIAL_TIMEOUT_S) as pool:
        yield pool


def run_all(pool: WorkerPool, payloads: dict[int, tuple]) -> dict[int, Outcome]:
    for key, payload in payloads.items():
        pool.submit(key, payload)
    outcomes = {}
    while pool.pending():
        outcomes.update({o.key: o for o in pool.wait(timeout_s=WAIT_S)})
    return outcomes


def pid_of(outcome: Outcome) -> int:
    """The worker process's pid, from the worker name 'worker-N (host:pid)'."""
    return int(outcome.worker.rstrip(")").rsplit(":", 1)[1])


def killed(pid: int, within_s: float = 10.0) -> bool:
    """ray.kill is asynchronous: give the process a moment to go."""
    give_up_at = time.monotonic() + within_s
    while time.monotonic() < give_up_at:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def assert_full_strength(pool: WorkerPool, meeting_dir: Path) -> set[int]:
    """Two tasks run at the same time on two processes. Returns their pids.

    A replacement worker needs a few seconds to start, and until then both tasks may take turns on the other
    worker: retry until they meet (or give up after ~WAIT_S).
    """
    for attempt in range(int(WAIT_S / MEET_S)):
        outcomes = run_all(pool, {100: ("meet", meeting_dir / str(attempt)), 101: ("meet", meeting_dir / str(attempt))})
        assert all(o.ok for o in outcomes.values()), outcomes
        if all(met for _, met in (o.value for o in outcomes.values())):
            pids = {pid for pid, _ in (o.value for o in outcomes.values())}
            assert len(pids) == 2 and pool.idle() == 2 and pool.pending() == 0
            return pids
    raise AssertionError("the pool never ran two tasks at once again")


def test_results_come_back_in_completion_order(pool):
    pool.submit(0, ("sleep", 2.0))
    pool.submit(1, ("echo", "fast"))
    assert pool.pending() == 2 and pool.idle() == 0
    first = pool.wait(timeout_s=WAIT_S)
    assert [(o.key, o.ok, o.value) for o in first] == [(1, True, "fast")]
    assert pool.wait(timeout_s=0.2) == []  # the slow one is still running
    second = pool.wait(timeout_s=WAIT_S)
    assert [(o.key, o.ok, o.value, o.error) for o in second] == [(0, True, 2.0, None)]
    assert second[0].seconds >= 2.0  # timed by the worker around its own run (an upper bound would be load)
    assert pool.wait(timeout_s=1) == []  # nothing pending: returns at once


def test_raising_task_is_recorded_and_its_worker_keeps_serving(pool, tmp_path):
    outcomes = run_all(pool, {10: ("raise", "bad\ncandidate"), 11: ("raise", "worse")})
    assert {o.key: (o.ok, o.value, o.error) for o in outcomes.values()} == {
        10: (False, None, "ValueError: bad candidate"),
        11: (False, None, "ValueError: worse"),
    }
    # Same processes afterwards: nothing was replaced.
    assert assert_full_strength(pool, tmp_path) == {pid_of(o) for o in outcomes.values()}


def test_hanging_task_times_out_and_its_worker_is_replaced(pool, tmp_path):
    outcomes = run_all(pool, {20: ("sleep", 600.0), 21: ("echo", 21)})
    hung = outcomes[20]
    assert (hung.ok, hung.error) == (False, f"timed out after {TRIAL_TIMEOUT_S:g} s")
    assert hung.seconds >= TRIAL_TIMEOUT_S  # killed at its deadline, not before
    assert outcomes[21].ok
    assert killed(pid_of(hung))  # the hung process was killed, not left running
    assert pid_of(hung) not in assert_full_strength(pool, tmp_path)


def test_crashing_worker_is_recorded_and_replaced(pool, tmp_path):
    outcomes = run_all(pool, {30: ("exit", 1), 31: ("echo", 31)})
    crashed = outcomes[30]
    assert not crashed.ok and crashed.error.startswith("worker crashed: ")
    assert "\n" not in crashed.error
    assert outcomes[31].ok
    assert pid_of(crashed) not in assert_full_strength(pool, tmp_path)


def test_factory_runs_once_per_actor(ray_session, tmp_path):
    log = tmp_path / "factory-calls.txt"
    with WorkerPool(ScriptedFactory(log), workers=2, num_cpus=0.5, num_gpus=0, trial_timeout_s=None) as pool:
        outcomes = run_all(pool, {key: ("pid", 0.2) for key in range(6)})
        assert {o.value for o in outcomes.values()} == {int(pid) for pid in log.read_text().split()}
        assert len(log.read_text().split()) == 2
        crashed = run_all(pool, {6: ("exit", 3)})[6]
        serving = assert_full_strength(pool, tmp_path / "meet")
        # The replacement ran the factory once more; the survivor did not run it again.
        calls = [int(pid) for pid in log.read_text().split()]
        assert len(calls) == 3 and set(calls) == serving | {pid_of(crashed)}


def test_factory_failing_everywhere_is_one_clear_error(ray_session, tmp_path):
    log = tmp_path / "factory-calls.txt"
    with WorkerPool(ScriptedFactory(log, fail=True), workers=2, num_cpus=0.5, num_gpus=0, trial_timeout_s=None) as pool:
        pool.submit(0, ("echo", 0))
        with pytest.raises(WorkerStartError) as caught:
            pool.wait(timeout_s=WAIT_S)
    assert str(caught.value) == (
        "no worker could start (each of 2 failed 2 times in a row): OSError: cannot load model from /nonexistent/model"
    )
    assert len(log.read_text().split()) == 4  # two tries per worker, then it stops


def test_bad_pool_sizes_are_rejected_before_starting_anything(ray_session):
    with pytest.raises(ValueError, match="workers must be >= 1"):
        WorkerPool(ScriptedFactory(), workers=0, num_cpus=0.5, num_gpus=0, trial_timeout_s=None)
    with pytest.raises(ValueError, match="3 workers x 1 CPU need 3 CPUs but the Ray cluster has 2"):
        WorkerPool(ScriptedFactory(), workers=3, num_cpus=1, num_gpus=0, trial_timeout_s=None)
    with pytest.raises(ValueError, match="trial_timeout_s must be > 0"):
        WorkerPool(ScriptedFactory(), workers=1, num_cpus=0.5, num_gpus=0, trial_timeout_s=0)


def listening_sockets(driver: psutil.Process) -> list[tuple[str, str]]:
    """(process name, listening IP) for the driver and every process it started (Ray's included)."""
    listeners = []
    for process in [driver, *driver.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.NoSuchProcess:  # idle Ray workers come and go
            continue
        listeners += [(name, c.laddr.ip) for c in connections if c.status == psutil.CONN_LISTEN]
    return listeners


def test_ray_listens_on_loopback_only_and_keeps_short_paths(ray_session):
    start_ray(None, RunDir(ray_session).ray_link, num_cpus=2)  # idempotent: a second call changes nothing
    listeners = listening_sockets(psutil.Process())
    assert {"gcs_server"} <= {name for name, _ in listeners}, listeners
    for name, ip in listeners:
        address = ipaddress.ip_address(ip)
        assert (getattr(address, "ipv4_mapped", None) or address) == ipaddress.ip_address("127.0.0.1"), (name, ip)
    link = RunDir(ray_session).ray_link
    assert link.resolve() == ray_temp_dir(link)
    sockets = list(link.resolve().glob("session_*/sockets/*"))
    assert sockets and all(len(str(path)) < 107 for path in sockets)
    assert not (Path.home() / ".ray" / "auth_token").exists()
