"""RunDir: the one owner of every file name in a search's run directory, and of how each is written.

    RUN_DIR/
      evomerge-run.json     what this directory is (format version): every reader checks it first
      search.yml            the config as it ran, every default filled in
      optuna.db             the Optuna study: every trial's genes, values and state (the truth for --resume)
      <study>.cmaes.json    CMA-ES state as plain data (mean, step size, covariance, paths, RNG, generation)
      mlflow.db, mlartifacts/   MLflow's runs (when tracking.mlflow_uri is left at its default)
      tracking.json         which MLflow parent run this search logs into
      recipes/trial-N.yml   the recipe of every trial, written when it is asked
      recipes/stage1.yml    ps+dfs: the stage-1 merge the paths read (as the run started with it)
      item_scores/<key>.json   per-item scores by recipe and split, part by part (the score cache)
      heldout_items.json    per-item held-out scores of every compared entry
      summary.json, report.md, best.yml   the results
      logs/workers.log      what the Ray workers printed (lm-eval, transformers), kept off the terminal
      ray -> /tmp/...       Ray's session files (a short path: Unix socket paths are limited)

Every file is written to a temporary sibling, fsynced, then renamed into place: a reader (or a resumed run)
sees the old file or the new one, never half of one.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge_core.errors import InputError

FORMAT = 1  # bump when a file's meaning changes; a run dir of another format is refused, not misread
MARKER = "evomerge-run.json"
TEMP_PREFIX = ".tmp-"


def write_atomically(path: Path, data: str | bytes, before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write `data` beside `path` and rename it into place; a kill at any point leaves the old file whole.

    `before_rename(temp)` runs after the data is on disk, before it replaces `path`: a format check, say.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    if before_rename is not None:
        before_rename(Path(tmp.name))
    os.replace(tmp.name, path)
    return path


class RunDir:
    """A run directory. `RunDir.create` starts one, `RunDir.open` checks an existing one; names are properties."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()

    # --- what lives here -----------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def resolved_config(self) -> Path:
        return self.path / "search.yml"

    @property
    def storage(self) -> Path:
        return self.path / "optuna.db"

    def optimizer_state(self, study_name: str) -> Path:
        return self.path / f"{study_name}.cmaes.json"

    @property
    def mlflow_uri(self) -> str:
        """The default tracking store: a sqlite database inside the run."""
        return f"sqlite:///{self.path / 'mlflow.db'}"

    @property
    def tracking(self) -> Path:
        return self.path / "tracking.json"

    @property
    def recipes(self) -> Path:
        return self.path / "recipes"

    @property
    def stage1(self) -> Path:
        return self.recipes / "stage1.yml"

    def trial_recipe(self, number: int) -> Path:
        return self.recipes / f"trial-{number}.yml"

    def item_scores(self, key: str) -> Path:
        return self.path / "item_scores" / f"{key}.json"

    @property
    def heldout_items(self) -> Path:
        return self.path / "heldout_items.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def best(self) -> Path:
        return self.path / "best.yml"

    @property
    def worker_log(self) -> Path:
        return self.path / "logs" / "workers.log"

    @property
    def ray_link(self) -> Path:
        return self.path / "ray"

    def relative(self, path: Path) -> str:
        """How summary.json names a file of this run (relative, so the directory can be moved)."""
        return str(Path(path).relative_to(self.path))

    # --- lifecycle -----------------------------------------------------------------------------------
    def holds_search(self) -> bool:
        return self.marker.exists() or self.storage.exists()

    def expect_search(self, held: bool, where: str) -> None:
        """Refuse to start a search over an old one (held=False), or to resume where none is (held=True)."""
        if held and not self.holds_search():
            raise InputError(where, "output_dir", f"{self.path} holds no search to resume")
        if not held and self.holds_search():
            raise InputError(
                where, "output_dir", f"{self.path} holds a previous search; pass --resume or choose another"
            )

    @classmethod
    def create(cls, path: Path, where: str) -> "RunDir":
        """A new run directory at `path` (which may exist, empty or not, but must hold no search)."""
        run = cls(path)
        run.expect_search(False, where)
        run.recipes.mkdir(parents=True, exist_ok=True)
        run.write_json(run.marker, {"format": FORMAT, "kind": "evomerge search run"})
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run directory, checked to be one this version can read."""
        run = cls(path)
        if not run.path.is_dir():
            raise InputError(run.path, None, "expected an evomerge run directory, got no such directory")
        try:
            marker = json.loads(run.marker.read_text())
            found = marker["format"]
        except FileNotFoundError:
            raise InputError(run.path, None, f"expected an evomerge run directory (with {MARKER}), got none") from None
        except (ValueError, KeyError, TypeError):
            raise InputError(run.marker, "format", "expected evomerge's run marker (JSON with a format)") from None
        if found != FORMAT:
            age = "an older" if isinstance(found, int) and found < FORMAT else "another"
            raise InputError(
                run.marker, "format", f"expected run format {FORMAT}, got {found!r} (written by {age} evomerge)"
            )
        run._remove_stale_temporaries()
        return run

    def _remove_stale_temporaries(self) -> None:
        """Temporaries a killed writer left behind: never renamed into place, so never read."""
        for folder in (self.path, self.recipes):
            for stale in folder.glob(f"{TEMP_PREFIX}*") if folder.is_dir() else ():
                stale.unlink(missing_ok=True)

    # --- reading and writing -------------------------------------------------------------------------
    def write_text(self, path: Path, text: str) -> Path:
        return write_atomically(self._inside(path), text)

    def write_json(self, path: Path, data: Any) -> Path:
        return write_atomically(self._inside(path), json.dumps(data, indent=2))

    def read_text(self, path: Path) -> str:
        try:
            return self._inside(path).read_text()
        except FileNotFoundError:
            raise InputError(self.path, None, f"expected {self.relative(path)} in the run, got none") from None

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(self.read_text(path))
        except ValueError:
            raise InputError(path, None, "expected JSON, got a file that does not parse") from None

    def _inside(self, path: Path) -> Path:
        path = Path(path)
        if not path.resolve().is_relative_to(self.path):
            raise ValueError(f"{path} is not inside the run directory {self.path}")
        return path
