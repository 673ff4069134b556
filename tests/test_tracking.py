"""Tracker on real MLflow (sqlite files under tmp_path) and real matplotlib.

Creating an MLflow database costs ~5 s, so the tests share one module database (one experiment each) and only
the quiet-terminal test creates its own, the way a search does: sqlite:///RUN_DIR/mlflow.db.
"""

import csv
import io
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from merge_core.errors import InputError
from search.results.heldout import HeldoutEntry, heldout_comparison
from search.results.tracking import Tracker, plot_best_vs_cost

CONFIG = {"seed": 7, "optimizer": {"name": "cmaes", "popsize": 4}, "models": [{"path": "a"}, {"path": "b"}]}
OBJECTIVES, DIRECTIONS = ["arith", "copy"], ["maximize", "maximize"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def genes(number: int) -> dict[str, float]:
    return {"slices.0.weight.a": number / 10, "slices.0.weight.b": 1 - number / 10}


def scores(number: int) -> dict[str, float]:
    return {"arith": number / 10, "copy": 1 - number / 10 - (0.3 if number == 2 else 0)}


def log_trials(tracker: Tracker, numbers) -> None:
    """Trial 3 fails; trial 2 is dominated by trial 1 on both objectives."""
    for number in numbers:
        failed = number == 3
        tracker.log_trial(
            number,
            genes(number),
            f"merge_method: linear\n# trial {number}\n",
            None if failed else scores(number),
            "failed" if failed else "complete",
            merge_s=0.25,
            eval_s=1.5,
            error="CUDA out of memory" if failed else None,
            items=None if failed else 20 + number,
        )


def children(client: MlflowClient, parent_id: str) -> dict[int, object]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {int(run.data.tags["evomerge.trial"]): run for run in runs}


def artifact_text(run_id: str, path: str, tracking_uri: str, dst: Path) -> str:
    return Path(
        download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri, dst_path=str(dst))
    ).read_text()


def test_a_search_logs_a_parent_with_nested_trials_and_its_front(tracking_uri, run_dir, tmp_path):
    tracker = Tracker(tracking_uri, "search-and-front", run_dir / "tracking.json")
    parent_id = tracker.start("toy-search", CONFIG, {"purpose": "test"})
    log_trials(tracker, range(5))
    tracker.log_step(1, {"arith": 0.4, "copy": 1.0}, hypervolume=0.42)
    front = [{"trial": n, **scores(n), "recipe": f"merge_method: linear\n# front {n}\n"} for n in (0, 1, 4)]
    tracker.log_front(front, OBJECTIVES, DIRECTIONS)
    tracker.finish("complete")

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "toy-search" and parent.info.status == "FINISHED"
    assert parent.data.tags["purpose"] == "test"
    params = parent.data.params
    assert params["seed"] == "7" and params["optimizer.popsize"] == "4" and params["models.1.path"] == "b"
    assert {"version.torch", "version.transformers", "version.lm_eval", "version.mlflow"} <= set(params)
    assert parent.data.metrics["hypervolume"] == 0.42 and parent.data.metrics["best/copy"] == 1.0
    assert json.loads((run_dir / "tracking.json").read_text())["parent_run_id"] == parent_id

    trials = children(client, parent_id)
    assert sorted(trials) == [0, 1, 2, 3, 4]
    for number, run in trials.items():
        assert run.info.run_name == f"trial-{number}"
        assert run.data.params == {k: repr(v) for k, v in genes(number).items()}
        assert run.data.metrics["merge_s"] == 0.25 and run.data.metrics["eval_s"] == 1.5
        assert run.data.metrics.get("items") == (None if number == 3 else 20 + number)  # 3 failed: no count
    assert trials[4].data.metrics["arith"] == pytest.approx(0.4) and trials[4].info.status == "FINISHED"
    assert trials[4].data.tags["evomerge.status"] == "complete" and "evomerge.error" not in trials[4].data.tags
    assert trials[3].info.status == "FAILED" and "arith" not in trials[3].data.metrics
    assert trials[3].data.tags["evomerge.status"] == "failed"
    assert trials[3].data.tags["evomerge.error"] == "CUDA out of memory"
    assert (
        artifact_text(trials[2].info.run_id, "recipe.yaml", tracking_uri, tmp_path)
        == "merge_method: linear\n# trial 2\n"
    )

    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "front")
    }
    expected = {"config.yaml", "front.csv", "front.png", "best_vs_cost.png", "front/trial-0.yaml", "front/trial-4.yaml"}
    assert expected <= artifacts
    table = list(csv.DictReader(io.StringIO(artifact_text(parent_id, "front.csv", tracking_uri, tmp_path))))
    assert [(row["trial"], row["arith"], row["recipe"]) for row in table] == [
        ("0", "0.0", "front/trial-0.yaml"),
        ("1", "0.1", "front/trial-1.yaml"),
        ("4", "0.4", "front/trial-4.yaml"),
    ]
    assert artifact_text(parent_id, "front/trial-1.yaml", tracking_uri, tmp_path).endswith("# front 1\n")
    for plot in ("front.png", "best_vs_cost.png"):
        png = download_artifacts(
            run_id=parent_id, artifact_path=plot, tracking_uri=tracking_uri, dst_path=str(tmp_path)
        )
        assert Path(png).read_bytes().startswith(PNG_MAGIC)
    assert "seed: 7" in artifact_text(parent_id, "config.yaml", tracking_uri, tmp_path)


def test_resume_continues_the_same_parent_without_duplicating_trials(tracking_uri, run_dir):
    first = Tracker(tracking_uri, "resume", run_dir / "tracking.json")
    parent_id = first.start("toy-search", CONFIG)
    log_trials(first, range(5))
    # Held-out and selection scores are no search scores: not in trial_scores.
    first.log_trial_split(1, "heldout", {"average": 0.5})
    first.log_trial_split(1, "selection", {"arith": 0.05})
    first.finish("failed")  # what the main loop records when the search is killed

    resumed = Tracker(tracking_uri, "resume", run_dir / "tracking.json")
    assert resumed.start("toy-search", CONFIG, resume=True) == parent_id
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent_id).info.status == "RUNNING"
    assert client.get_run(parent_id).data.tags["evomerge.resumes"] == "1"
    # Trial 3 is replayed and succeeds this time; trial 5 is new.
    resumed.log_trial(3, genes(3), "merge_method: linear\n", scores(3), "complete", merge_s=0.2, eval_s=1.0)
    resumed.log_trial(5, genes(5), "merge_method: linear\n", scores(5), "complete", merge_s=0.2, eval_s=1.0, items=7)
    resumed.finish()

    trials = children(client, parent_id)
    assert sorted(trials) == [0, 1, 2, 3, 4, 5]
    assert trials[3].info.status == "FINISHED" and trials[3].data.tags["evomerge.status"] == "complete"
    assert "evomerge.error" not in trials[3].data.tags
    assert trials[3].data.metrics["copy"] == pytest.approx(0.7) and trials[3].data.metrics["eval_s"] == 1.0
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(parent_id).info.experiment_id])) == 7  # parent + 6 trials
    # The resumed tracker knows every complete trial's scores, those logged before the resume too.
    assert sorted(resumed.trial_scores) == [0, 1, 2, 3, 4, 5]
    assert resumed.trial_scores[1] == pytest.approx(scores(1))
    assert resumed.trial_items == {0: 20, 1: 21, 2: 22, 4: 24, 5: 7}  # the failed trial 3 has no known count
    assert trials[1].data.metrics["heldout/average"] == 0.5 and trials[1].data.metrics["selection/arith"] == 0.05


def test_a_replay_with_other_genes_is_refused(tracking_uri, run_dir):
    tracker = Tracker(tracking_uri, "replay", run_dir / "tracking.json")
    tracker.start("toy-search", CONFIG)
    log_trials(tracker, [1])
    with pytest.raises(ValueError, match=r"trial 1: already logged .* other gene values"):
        tracker.log_trial(1, genes(2), "", scores(1), "complete", merge_s=0.1, eval_s=0.1)


def test_resume_problems_are_one_line_errors_naming_tracking_json(tracking_uri, run_dir):
    tracker = Tracker(tracking_uri, "resume-errors", run_dir / "tracking.json")
    assert tracker.start("fresh", CONFIG, resume=True)  # nothing to resume yet: a new parent
    other_uri = "http://127.0.0.1:9"  # checked before any request is made
    with pytest.raises(InputError, match=r"tracking\.json: tracking_uri: this search was tracked at sqlite:///"):
        Tracker(other_uri, "resume-errors", run_dir / "tracking.json").start("fresh", CONFIG, resume=True)
    (run_dir / "tracking.json").write_text("{broken")
    with pytest.raises(InputError, match=r"tracking\.json: expected JSON with tracking_uri"):
        Tracker(tracking_uri, "resume-errors", run_dir / "tracking.json").start("fresh", CONFIG, resume=True)
    (run_dir / "tracking.json").write_text(json.dumps({"tracking_uri": tracking_uri, "parent_run_id": "0" * 32}))
    with pytest.raises(InputError, match=r"tracking\.json: parent_run_id: run 0{32} not found"):
        Tracker(tracking_uri, "resume-errors", run_dir / "tracking.json").start("fresh", CONFIG, resume=True)


def test_single_objective_front_and_heldout_table(tracking_uri, run_dir, tmp_path):
    tracker = Tracker(tracking_uri, "single-objective", run_dir / "tracking.json")
    parent_id = tracker.start("one-objective", CONFIG)
    for number in range(4):
        tracker.log_trial(number, genes(number), "", {"acc,none": number / 4}, "complete", merge_s=0.1, eval_s=0.1)
    tracker.log_front([{"trial": 3, "acc,none": 0.75}], ["acc,none"], ["maximize"])
    entries = [
        HeldoutEntry("parent", "parent", {"arith": [1.0, 0.0, 0.0, 0.0]}),
        HeldoutEntry("trial-3", "evolved", {"arith": [1.0, 1.0, 1.0, 0.0]}),
    ]
    tracker.log_heldout(heldout_comparison(entries, resamples=100))

    client = MlflowClient(tracking_uri)
    trial = children(client, parent_id)[2]
    assert trial.data.metrics["acc_none"] == 0.5  # lm-eval's comma is not a valid MLflow key character
    metrics = client.get_run(parent_id).data.metrics
    assert metrics["heldout/trial-3/average"] == 0.75 and metrics["heldout/parent/arith"] == 0.25
    heldout = list(csv.DictReader(io.StringIO(artifact_text(parent_id, "heldout.csv", tracking_uri, tmp_path))))
    assert [(row["task"], row["entry"], row["best_parent"]) for row in heldout][-1] == ("average", "trial-3", "parent")
    assert float(heldout[-1]["diff_vs_parent"]) == pytest.approx(0.5)
    assert "vs best parent" in artifact_text(parent_id, "heldout.txt", tracking_uri, tmp_path)
    png = download_artifacts(
        run_id=parent_id, artifact_path="front.png", tracking_uri=tracking_uri, dst_path=str(tmp_path)
    )
    assert Path(png).read_bytes().startswith(PNG_MAGIC)


def test_best_vs_cost_counts_every_item_paid_for():
    """Trial 1 failed after scoring 30 items: it moves the cost on but adds no point; trial 4 has no known count."""
    scores = {0: {"acc_none": 0.2}, 2: {"acc_none": 0.1}, 3: {"acc_none": 0.5}, 4: {"acc_none": 0.4}}
    items = {0: 10, 1: 30, 2: 10, 3: 10}
    figure = plot_best_vs_cost(scores, items, ["acc,none"], ["maximize"])
    (line,) = figure.axes[0].lines
    assert list(line.get_xdata()) == [10, 50, 60, 60]
    assert list(line.get_ydata()) == [0.2, 0.2, 0.5, 0.5]
    assert line.get_label() == "acc,none (maximize)"
    (minimized,) = plot_best_vs_cost(scores, items, ["acc,none"], ["minimize"]).axes[0].lines
    assert list(minimized.get_ydata()) == [0.2, 0.1, 0.1, 0.1]


def test_a_fresh_search_database_is_quiet_and_keeps_artifacts_in_the_run_dir(tmp_path, capfd):
    run_dir = tmp_path / "run"
    tracker = Tracker(f"sqlite:///{run_dir / 'mlflow.db'}", "evomerge", run_dir / "tracking.json")
    parent_id = tracker.start("quiet", CONFIG)
    log_trials(tracker, range(2))
    tracker.log_front([{"trial": 1, **scores(1)}], OBJECTIVES, DIRECTIONS)
    tracker.finish()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (run_dir / "mlflow.db").is_file()
    assert list((run_dir / "mlartifacts").glob(f"{parent_id}/artifacts/front.png"))
