"""MLflow tracking for a search: one parent run per search, one nested child run per trial.

Everything goes through `MlflowClient` (no fluent global "active run"), one batched call per trial. The parent
run id lives in the run's tracking.json (RunDir.tracking) so a resumed search continues under the same parent, and child runs are
found again by their trial tag, so logging a trial twice updates its run instead of adding a duplicate.
"""

import csv
import io
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from merge_core.errors import InputError
from search.results.heldout import HeldoutRow, format_table
from search.results.statistics import DIRECTIONS
from search.run_dir import write_atomically

TRIAL_TAG = "evomerge.trial"  # how a resumed search finds a trial's child run again
STATUS_TAG = "evomerge.status"
ERROR_TAG = "evomerge.error"
NODE_TAG = "evomerge.node"  # the Ray node id the trial ran on
WORKER_TAG = "evomerge.worker"  # the worker it ran on: "worker-<slot> (<host>:<pid>)"
PATH_TAG = "evomerge.path"  # a layer-path trial's path, e.g. "rev 0-1, srt 1 ×0.8" (genome.kind dfs)
RESUMES_TAG = "evomerge.resumes"
GATE_TAG = "evomerge.gate"  # 'passed: ...' or 'failed: ...' (filter with LIKE 'failed%')
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another
COST_METRICS = ("merge_s", "eval_s", "items")  # what a trial cost, beside its scores
HELDOUT_PREFIX = "heldout/"
SPLIT_PREFIXES = (HELDOUT_PREFIX, "selection/")  # a trial's metrics from after the search: not its search scores
RUN_STATUS = {"complete": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
VERSIONED_PACKAGES = ("evomerge", "torch", "transformers", "lm_eval", "mergekit", "mlflow")
# MLflow's per-call limits: params and tags 100 each, 1000 entities in all.
BATCH_PARAMS, BATCH_TAGS, BATCH_METRICS = 100, 100, 800


def metric_key(name: str) -> str:
    """A name MLflow accepts as a metric or param key: lm-eval's 'acc,none' becomes 'acc_none'."""
    return re.sub(r"[^/\w.\- :]", "_", name)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'optimizer.popsize': '8', 'models.0.path': '...'}; the YAML artifact keeps the rest."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list | tuple) and any(isinstance(item, Mapping) for item in value):
            flat |= flatten({str(i): item for i, item in enumerate(value)}, f"{name}.")
        else:
            flat[metric_key(name)] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue  # mergekit is a test-only oracle; evomerge may run from a source tree
    return versions


def _to_csv(records: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for record in records for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """A search's MLflow runs. Call `start` first; every other logging method needs the parent run."""

    def __init__(self, tracking_uri: str, experiment: str, state_file: Path):
        # state_file: where the parent run's id is kept (RunDir.tracking), so a resumed search finds it again
        self.tracking_uri, self.experiment, self.state_file = tracking_uri, experiment, Path(state_file)
        # MLflow logs database creation and migrations at INFO on the user's terminal: nothing they must act on.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._children: dict[int, str] = {}  # trial number -> child run id
        self.trial_scores: dict[int, dict[str, float]] = {}  # complete trials, resumed ones too: metric key -> score
        self.trial_items: dict[int, int] = {}  # items each trial was scored on (failed ones too, where known)

    # -- the parent run -------------------------------------------------------------------------------------
    def start(
        self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str] | None = None, resume: bool = False
    ) -> str:
        """Open the search's parent run and return its id.

        `config` is plain data (SearchConfig.model_dump(mode="json")). A new parent gets it as flattened params
        (the seed among them) and as config.yaml, plus the package versions. With resume=True and a
        state file, the recorded parent is re-opened instead (its config params stay those the search
        started with); without that file a new parent starts.
        """
        state_file = self.state_file
        if resume and state_file.exists():
            return self._reopen(state_file, tags or {})
        self.experiment_id = self._experiment_id()
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.parent_run_id = run.info.run_id
        self._children, self.trial_scores, self.trial_items = {}, {}, {}
        versions = {f"version.{package}": version for package, version in package_versions().items()}
        self._log_batch(self.parent_run_id, params=flatten(config) | versions)
        self.client.log_text(self.parent_run_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")
        state = {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": run.info.run_id,
        }
        write_atomically(state_file, json.dumps(state, indent=2))
        return self.parent_run_id

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return self.client.create_experiment(self.experiment, artifact_location=self._artifact_location())
        if experiment.lifecycle_stage == "deleted":
            raise InputError(
                self.tracking_uri,
                "tracking.experiment",
                f"{self.experiment!r} is deleted: restore it (mlflow experiments restore) or choose another name",
            )
        return experiment.experiment_id

    def _artifact_location(self) -> str | None:
        """Artifacts of a sqlite store go beside the database, not into ./mlruns of whatever cwd we run in."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None  # a file store keeps them inside itself; a server decides for itself
        database = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
        return (database.parent / "mlartifacts").as_uri()

    def _reopen(self, state_file: Path, tags: Mapping[str, str]) -> str:
        try:
            state = json.loads(state_file.read_text())
            recorded_uri, parent = state["tracking_uri"], state["parent_run_id"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                state_file, None, f"expected JSON with tracking_uri and parent_run_id ({err}); delete it to track anew"
            ) from None
        if recorded_uri != self.tracking_uri:
            raise InputError(
                state_file,
                "tracking_uri",
                f"this search was tracked at {recorded_uri}, not {self.tracking_uri}; resume with the same tracking URI",
            )
        try:
            run = self.client.get_run(parent)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            raise InputError(state_file, "parent_run_id", f"run {parent} not found at {self.tracking_uri}")
        self.parent_run_id, self.experiment_id = parent, run.info.experiment_id
        # A killed search leaves its parent RUNNING or FAILED; either way it is running again now.
        self.client.update_run(parent, status="RUNNING")
        resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        self._log_batch(parent, tags=dict(tags) | {RESUMES_TAG: str(resumes)})
        self._load_children()
        return parent

    def _load_children(self) -> None:
        self._children, self.trial_scores, self.trial_items = {}, {}, {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                max_results=1000,
                page_token=token,
            )
            for run in page:
                trial = int(run.data.tags[TRIAL_TAG])
                self._children.setdefault(trial, run.info.run_id)
                metrics = run.data.metrics
                if "items" in metrics:
                    self.trial_items[trial] = int(metrics["items"])
                if run.data.tags.get(STATUS_TAG) == "complete":
                    self.trial_scores[trial] = {
                        k: v for k, v in metrics.items() if k not in COST_METRICS and not k.startswith(SPLIT_PREFIXES)
                    }
            token = page.token
            if not token:
                return

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("Tracker.start() must be called before logging")
        return self.parent_run_id

    def _log_batch(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        now = _now_ms()
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        metric_list = [Metric(metric_key(k), float(v), now, step) for k, v in (metrics or {}).items()]
        tag_list = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in (tags or {}).items()]
        while param_list or metric_list or tag_list:
            self.client.log_batch(
                run_id,
                params=param_list[:BATCH_PARAMS],
                metrics=metric_list[:BATCH_METRICS],
                tags=tag_list[:BATCH_TAGS],
            )
            param_list, metric_list = param_list[BATCH_PARAMS:], metric_list[BATCH_METRICS:]
            tag_list = tag_list[BATCH_TAGS:]

    def log_step(self, step: int, best: Mapping[str, float], hypervolume: float) -> None:
        """Best-so-far per objective and the front's hypervolume, on the parent at `step`."""
        metrics = {f"best/{name}": value for name, value in best.items()} | {"hypervolume": hypervolume}
        self._log_batch(self._parent(), metrics=metrics, step=step)

    def finish(self, status: Literal["complete", "failed", "killed"] = "complete") -> None:
        self.client.set_terminated(self._parent(), RUN_STATUS[status])

    # -- trials ---------------------------------------------------------------------------------------------
    def has_trial(self, number: int) -> bool:
        """Whether trial `number` has its child run (this session's or, resumed, an earlier one's)."""
        return number in self._children

    def log_trial(
        self,
        number: int,
        params: Mapping[str, float],
        recipe_yaml: str,
        scores: Mapping[str, float] | None,
        status: Literal["complete", "stopped", "failed"],
        merge_s: float,
        eval_s: float,
        error: str | None = None,
        items: int | None = None,
        fidelity: int | None = None,
        node: str | None = None,
        worker: str | None = None,
        path: str | None = None,
    ) -> str:
        """One child run per trial number: genes as params, scores, seconds and items as metrics, the recipe as YAML.

        `items`: how many items the candidate was scored on (its cost); None where no scores came back.
        `fidelity`: with fitness rungs, the items per task its scores are of; "stopped": a cheaper rung's.
        `node`, `worker`: the Ray node id and the worker (slot, host:pid) its last part ran on; a worker loads
        the sources once, so the distinct workers of a run are how many times the sources were loaded.
        `path`: a layer-path trial's path in one line (genome.kind dfs), as a tag to filter and read in the UI.

        Logging a number again (a resumed search replaying its last trials) updates the same child run. The
        genes must be the same as before: MLflow params cannot change, and a replay that changes them is a bug.
        """
        if status not in ("complete", "stopped", "failed"):
            raise ValueError(f"log_trial: status: expected 'complete', 'stopped' or 'failed', got {status!r}")
        parent = self._parent()
        run_id = self._children.get(number)
        if run_id is None:
            # Backdate the start so the UI's duration column shows the trial's own merge + evaluation time.
            started = _now_ms() - int((merge_s + eval_s) * 1000)
            run = self.client.create_run(
                self.experiment_id,
                start_time=started,
                run_name=f"trial-{number}",
                tags={PARENT_TAG: parent, TRIAL_TAG: str(number)},
            )
            run_id = self._children[number] = run.info.run_id
        elif error is None:
            self._delete_tag(run_id, ERROR_TAG)  # a replay that succeeded must not keep the old error
        tags = {STATUS_TAG: status} | ({ERROR_TAG: error} if error else {}) | ({NODE_TAG: node} if node else {})
        tags |= {WORKER_TAG: worker} if worker else {}
        tags |= {PATH_TAG: path[:MAX_TAG_VAL_LENGTH]} if path else {}
        score_metrics = {metric_key(name): value for name, value in (scores or {}).items()}
        cost = {"merge_s": merge_s, "eval_s": eval_s} | ({"items": items} if items is not None else {})
        cost |= {"fidelity": fidelity} if fidelity is not None else {}
        try:
            self._log_batch(
                run_id,
                params={metric_key(k): repr(float(v)) for k, v in params.items()},
                metrics=score_metrics | cost,
                tags=tags,
            )
        except MlflowException as err:
            if "Changing param values is not allowed" not in err.message:
                raise
            raise ValueError(
                f"trial {number}: already logged in MLflow run {run_id} with other gene values; "
                f"a resumed search must replay the same genome for the same trial number"
            ) from None
        self.client.log_text(run_id, recipe_yaml, "recipe.yaml")
        self.client.set_terminated(run_id, RUN_STATUS[status])
        if status == "complete" and score_metrics:
            self.trial_scores[number] = score_metrics
        else:
            self.trial_scores.pop(number, None)
        if items is not None:
            self.trial_items[number] = items
        return run_id

    def log_trial_split(self, number: int, split: str, scores: Mapping[str, float]) -> None:
        """A trial's scores on a split after the search (heldout, selection) on its own child run, as
        <split>/<task> metrics."""
        if f"{split}/" not in SPLIT_PREFIXES:
            raise ValueError(f"log_trial_split: split: expected one of {SPLIT_PREFIXES}, got {split!r}")
        run_id = self._children.get(number)
        if run_id is None:
            raise ValueError(f"log_trial_split: trial {number} has no child run; log_trial it first")
        self._log_batch(run_id, metrics={f"{split}/{task}": value for task, value in scores.items()})

    def _delete_tag(self, run_id: str, key: str) -> None:
        try:
            self.client.delete_tag(run_id, key)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    # -- the front and the held-out comparison ---------------------------------------------------------------
    def log_front(
        self, rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], directions: Sequence[str]
    ) -> None:
        """The Pareto front on the parent: front.csv, front.png, front/trial-N.yaml per member, and best_vs_cost.png.

        Each row needs 'trial' and a value per objective; an optional 'recipe' holds the recipe YAML text, and
        any other scalar keys (held-out scores, say) become more CSV columns. Calling it again replaces
        front.csv and front.png; recipe files of trials that left the front stay, front.csv is the truth.
        """
        parent = self._parent()
        if len(directions) != len(objectives) or not set(directions) <= set(DIRECTIONS):
            raise ValueError(
                f"log_front: expected one of {DIRECTIONS} per objective {list(objectives)}, got {list(directions)}"
            )
        records = []
        for row in rows:
            missing = [key for key in ("trial", *objectives) if key not in row]
            if missing:
                raise ValueError(f"log_front: row {dict(row)!r}: missing {missing}")
            record = {key: value for key, value in row.items() if key != "recipe"}
            if "recipe" in row:
                record["recipe"] = f"front/trial-{row['trial']}.yaml"
                self.client.log_text(parent, row["recipe"], record["recipe"])
            records.append(record)
        self.client.log_text(parent, _to_csv(records), "front.csv")
        figure = plot_front(self.trial_scores, records, objectives, directions)
        self.client.log_figure(parent, figure, "front.png")
        figure = plot_best_vs_cost(self.trial_scores, self.trial_items, objectives, directions)
        self.client.log_figure(parent, figure, "best_vs_cost.png")

    def log_best(self, best_file: Path) -> None:
        """The recommended recipe (best.yml) on the parent, where a reviewer looks for the result."""
        self.client.log_artifact(self._parent(), str(best_file))

    def log_gate(self, passed: bool, reason: str) -> None:
        """Whether the recommended evolved recipe beat the best parent and the best tuned baseline, on the parent."""
        self._log_batch(self._parent(), tags={GATE_TAG: f"{'passed' if passed else 'failed'}: {reason}"})

    def log_heldout(self, rows: Sequence[HeldoutRow]) -> None:
        """The held-out comparison: heldout.csv, the terminal table as heldout.txt, and scores as metrics."""
        parent = self._parent()
        self.client.log_text(parent, _to_csv([row.as_record() for row in rows]), "heldout.csv")
        self.client.log_text(parent, format_table(rows) + "\n", "heldout.txt")
        self._log_batch(parent, metrics={f"{HELDOUT_PREFIX}{row.entry}/{row.task}": row.score for row in rows})


def plot_front(
    trial_scores: Mapping[int, Mapping[str, float]],
    front: Sequence[Mapping[str, Any]],
    objectives: Sequence[str],
    directions: Sequence[str],
) -> Figure:
    """1 objective: every trial and the best-so-far curve by trial number. 2 or more: every trial on the first two
    objectives with the front highlighted (a projection when there are more than two)."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")  # no pyplot: no global state, no GUI backend
    axes = figure.add_subplot()
    keys = [metric_key(name) for name in objectives]
    trials = sorted(number for number, scores in trial_scores.items() if all(k in scores for k in keys))
    values = np.array([[trial_scores[t][k] for k in keys] for t in trials]).reshape(len(trials), len(keys))
    front_values = np.array([[float(row[name]) for name in objectives] for row in front]).reshape(len(front), -1)
    if len(objectives) == 1:
        accumulate = np.maximum.accumulate if directions[0] == "maximize" else np.minimum.accumulate
        axes.scatter(trials, values[:, 0], s=12, color="0.6", label="trials")
        if trials:
            axes.step(trials, accumulate(values[:, 0]), where="post", color="C0", label="best so far")
        axes.scatter([row["trial"] for row in front], front_values[:, 0], s=60, marker="*", color="C3", label="best")
        axes.set_xlabel("trial")
        axes.set_ylabel(f"{objectives[0]} ({directions[0]})")
    else:
        axes.scatter(values[:, 0], values[:, 1], s=12, color="0.6", label="trials")
        if len(objectives) == 2:  # joining the front only means something when it lives in these two axes
            line = front_values[np.argsort(front_values[:, 0])]
            axes.plot(line[:, 0], line[:, 1], color="C3", linewidth=1)
        axes.scatter(front_values[:, 0], front_values[:, 1], s=40, color="C3", label="Pareto front", zorder=3)
        axes.set_xlabel(f"{objectives[0]} ({directions[0]})")
        axes.set_ylabel(f"{objectives[1]} ({directions[1]})")
    projection = f", first 2 of {len(objectives)} objectives" if len(objectives) > 2 else ""
    axes.set_title(f"{len(trials)} complete trials, {len(front)} on the front{projection}", fontsize="small")
    axes.legend(loc="best", fontsize="small")
    return figure


def plot_best_vs_cost(
    trial_scores: Mapping[int, Mapping[str, float]],
    trial_items: Mapping[int, int],
    objectives: Sequence[str],
    directions: Sequence[str],
) -> Figure:
    """Best-so-far per objective against the items evaluated so far, trials taken in the order they were asked.

    Failed trials add their items to the cost (they were paid for) but no point; one whose scores never came back
    has no known item count and adds nothing."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    axes = figure.add_subplot()
    trials = sorted(set(trial_scores) | set(trial_items))
    spent = dict(zip(trials, np.cumsum([trial_items.get(t, 0) for t in trials]).tolist(), strict=True))
    for name, direction in zip(objectives, directions, strict=True):
        key = metric_key(name)
        scored = [t for t in trials if key in trial_scores.get(t, {})]
        accumulate = np.maximum.accumulate if direction == "maximize" else np.minimum.accumulate
        best = accumulate(np.array([trial_scores[t][key] for t in scored]))
        axes.step(
            [spent[t] for t in scored], best, where="post", marker="o", markersize=3, label=f"{name} ({direction})"
        )
    axes.set_xlabel("items evaluated (cumulative)")
    axes.set_ylabel("best so far")
    axes.set_title(
        f"best so far against cost, {sum(trial_items.values())} items in {len(trials)} trials", fontsize="small"
    )
    axes.legend(loc="best", fontsize="small")
    return figure
