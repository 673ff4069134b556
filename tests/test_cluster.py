"""A real two-node Ray cluster on this machine (loopback only): a search runs on it by address, loses a node
mid-run, still completes its whole budget without failing or double-charging a trial, and resumes on what is
left of the cluster. Every process it starts it stops, by process group."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from test_search_e2e import EVOMERGE, trial_items, write_config

from search.results.summary import read_summary
from search.run_dir import RunDir

RAY = Path(sys.executable).parent / "ray"
# `ray start --block` for a second node on this machine, every listener on loopback. With
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray's processes on 127.0.0.1) `ray start --address` refuses to
# join a cluster, and without it Ray rewrites 127.0.0.1 to the machine's routable address; so, as
# shared/notes/stack.md measured, the process allows the cluster and pins the node address to loopback itself,
# and the processes it spawns inherit the variable. The resource `second_node` tells its node id apart; its
# files go under the head's temp dir.
SECOND_NODE = """
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda *_, **__: "127.0.0.1"
services.node_ip_address_from_perspective = lambda *_, **__: "127.0.0.1"
from ray.scripts.scripts import start
address, num_cpus = sys.argv[1:3]
start.main(args=["--block", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", num_cpus,
                 "--resources", '{"second_node": 1}'])
"""
TRIALS = 16
NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == 2:
        break
    time.sleep(1)
print(json.dumps({("second" if "second_node" in n["Resources"] else "head"): n["NodeID"] for n in alive}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A head and a second node, one CPU each, sharing a fresh auth token; yields (address, env, processes)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="evomerge-cluster-", dir="/tmp"))  # Ray's socket paths must be short
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head_command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        address.split(":")[1],
    ]
    head_command += ["--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", str(temp_dir)]
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("head", "second")}
    processes = {
        "head": subprocess.Popen(
            head_command, env=env, stdout=logs["head"], stderr=subprocess.STDOUT, start_new_session=True
        )
    }
    try:
        time.sleep(5)  # the GCS must answer before a node joins it
        processes["second"] = subprocess.Popen(
            [sys.executable, "-c", SECOND_NODE, address, "1"],
            env=env,
            stdout=logs["second"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        yield address, env, processes
    finally:
        for process in processes.values():
            with_group_killed(process)
        for log in logs.values():
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def with_group_killed(process: subprocess.Popen) -> None:
    """SIGKILL to a node and everything under it, as a lost machine: its process group (raylet, GCS) and every
    descendant, since Ray starts its worker processes in sessions of their own."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def nodes_so_far(run_dir: Path) -> set[str]:
    """The nodes that finished a trial so far, from MLflow's sqlite store (none until the search created it)."""
    try:
        with sqlite3.connect(run_dir / "mlflow.db") as db:
            return {value for (value,) in db.execute("select value from tags where key = 'evomerge.node'")}
    except sqlite3.OperationalError:  # the file exists before its tables do
        return set()


def trial_tags(run_dir: Path, tag: str) -> dict[int, str]:
    """Each trial's MLflow tag `tag`, by trial number."""
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return {int(r.data.tags["evomerge.trial"]): r.data.tags[tag] for r in runs if "evomerge.trial" in r.data.tags}


def test_a_search_survives_losing_a_node_and_resumes_on_the_rest(toy_family, tmp_path, cluster):
    address, env, processes = cluster
    nodes = subprocess.run([sys.executable, "-c", NODES, address], env=env, capture_output=True, text=True, timeout=150)
    ids = json.loads(nodes.stdout.strip().splitlines()[-1])
    assert set(ids) == {"head", "second"}, nodes.stderr[-2000:]
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        optimizer={"name": "random"},
        budget={"trials": TRIALS},
        fitness={"limit": 200},  # trials of a second or two, so the node dies while one runs there
        execution={"workers": 2, "ray_address": address, "trial_timeout": 300},
    )
    run_dir = tmp_path / "run"
    search = subprocess.Popen(
        [EVOMERGE, "run", config], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if ids["second"] in nodes_so_far(run_dir):  # the second node has finished a trial: kill it now
                break
            assert search.poll() is None, search.stdout.read()
            time.sleep(0.2)
        with_group_killed(processes["second"])  # a lost machine: its raylet, its workers, everything
        output, _ = search.communicate(timeout=400)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, output[-3000:]

    summary = read_summary(RunDir.open(run_dir))
    # The whole budget completed: the trial the dead node was running is neither a failure nor charged twice.
    assert (summary.trials.complete, summary.trials.failed) == (TRIALS, 0)
    per_candidate = 200 * len(toy_family.children)
    assert trial_items(run_dir) == dict.fromkeys(range(TRIALS), per_candidate)
    # What the dead node was running when it died (a trial, or an after-search request: key < 0) ran again.
    moved = [int(line.rsplit("trial ", 1)[1].split()[0]) for line in output.splitlines() if "its node died" in line]
    assert moved, output[-3000:]
    tags, workers = trial_tags(run_dir, "evomerge.node"), trial_tags(run_dir, "evomerge.worker")
    assert set(tags) == set(range(TRIALS)) and set(tags.values()) == {ids["head"], ids["second"]}
    assert all(tags[key] == ids["head"] for key in moved if key >= 0)  # re-run on the node still alive
    # Sources are loaded once per worker process, not per trial: 16 trials, at most 3 workers (2, and the one
    # started again for the lost slot, if Ray found room for it).
    assert 2 <= len(set(workers.values())) <= 3, workers

    # --resume against the cluster that is left (one node of one CPU): nothing is run again, nothing lost.
    resumed = subprocess.run(
        [EVOMERGE, "run", config, "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    again = read_summary(RunDir.open(run_dir))
    assert (again.trials.complete, again.trials.failed, again.trials.final_items) == (TRIALS, 0, 0)
    assert trial_tags(run_dir, "evomerge.node") == tags


def test_a_cluster_without_the_gpus_asked_for_is_one_line(toy_family, tmp_path, cluster):
    address, env, _ = cluster
    config = write_config(
        tmp_path / "search.yml", toy_family, execution={"workers": 1, "gpus_per_worker": 1, "ray_address": address}
    )
    result = subprocess.run([EVOMERGE, "run", config], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = f"{config}: execution.gpus_per_worker: expected workers × gpus_per_worker within the 0 GPUs of the Ray "
    line += f"cluster at {address}, got 1 × 1"
    assert result.stderr.strip().splitlines()[-1] == f"evomerge: {line}" or line in result.stderr, result.stderr[-2000:]
