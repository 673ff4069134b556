"""A search tracked on a real `mlflow server` (http URI): runs, metrics and proxied artifacts land on the server."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_dashboard import LIMIT, bindable, free_ports
from test_search_e2e import EVOMERGE, write_config

from search.config import SearchConfig
from search.run_dir import RunDir
from search.runner import run_search

TRIALS = 4
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_ports()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'srv.db'}", "--artifacts-destination", str(root / "art")]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}"
        try:
            with LOOPBACK.open(f"{url}/health", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.5)
    yield url, root / "art"
    os.killpg(process.pid, signal.SIGTERM)  # its own group: the uvicorn worker goes with it
    process.wait(30)


@pytest.fixture(scope="module")
def search(server, toy_family, tmp_path_factory):
    url, _ = server
    config = write_config(
        tmp_path_factory.mktemp("tracked") / "search.yml",
        toy_family,
        fitness={"limit": LIMIT},
        held_out={"limit": LIMIT},
        budget={"trials": TRIALS},
        tracking={"mlflow_uri": url},
    )
    assert SearchConfig.from_yaml(config).tracking.mlflow_uri == url  # an http URI is taken as it is
    summary = run_search(config)
    return RunDir(config.parent / "run"), summary


def test_every_trial_lands_on_the_server_with_metrics_and_recipe(server, search, toy_family, tmp_path):
    url, artifacts = server
    run, summary = search
    state = json.loads(run.tracking.read_text())
    assert state["tracking_uri"] == url
    client = MlflowClient(url)
    experiment = client.get_experiment(state["experiment_id"])
    assert experiment.name == "evomerge"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's choice, proxied by it

    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"front.png", "front.csv", "best_vs_cost.png", "best.yml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = {int(r.data.tags["evomerge.trial"]): r for r in children}
    assert sorted(trials) == list(range(TRIALS))
    for number, trial in trials.items():
        assert trial.info.run_name == f"trial-{number}"
        assert trial.data.tags["evomerge.status"] == "complete"
        metrics = trial.data.metrics
        assert metrics["items"] == LIMIT * len(toy_family.children)  # toy_search: a group of one task per skill
        assert metrics["merge_s"] > 0 and metrics["eval_s"] > 0 and 0 <= metrics["toy_search"] <= 1
        recipe = client.download_artifacts(trial.info.run_id, "recipe.yaml", str(tmp_path))
        assert Path(recipe).read_text() == run.read_text(run.trial_recipe(number))
        stored = artifacts / experiment.experiment_id / trial.info.run_id / "artifacts" / "recipe.yaml"
        assert stored.read_text() == run.read_text(run.trial_recipe(number))  # in --artifacts-destination
    front = {member.trial: member.heldout for member in summary.front}
    for number, heldout in front.items():
        assert trials[number].data.metrics["heldout/average"] == pytest.approx(heldout["average"])


def test_ui_points_at_the_tracking_server_and_starts_nothing(server, search):
    url, _ = server
    run, _ = search
    state = json.loads(run.tracking.read_text())
    port = int(url.rsplit(":", 1)[1])
    result = subprocess.run([str(EVOMERGE), "ui", str(run.path), "--port", str(port)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    page = f"{url}/#/experiments/{state['experiment_id']}/runs/{state['parent_run_id']}"
    assert result.stdout == f"MLflow (served by its tracking server): {page}\n"
    assert not bindable(port)  # the tracking server still holds it: nothing was started or stopped there
