"""The ask/tell interface every optimizer implements, and the one Optuna study they all record into.

Workers ask for a genome, evaluate it, and tell its objective values (None: the candidate failed). Every
trial, whichever optimizer proposed it, is an Optuna trial in RUN_DIR/optuna.db: its genes as params, its
values, state COMPLETE, PRUNED (stopped at a cheaper fitness rung: search/fitness/rungs.py) or FAIL, and user attrs (ITEMS: the items it was scored on). So the history, the
Pareto front and the cost are one query away (`optuna.load_study(...).best_trials`), and a new process
opening the same storage resumes the search:
finished trials stay finished and are never asked again; trials a killed process left RUNNING are marked
FAIL (their numbers listed in the study's "interrupted" user attr, not counted as done) and their genomes
re-queued, so they are evaluated again under new trial numbers.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.exc import DatabaseError

from merge_core.errors import InputError
from search.fitness.rungs import RUNG_FITNESS
from search.genome import Genome

INTERRUPTED = "interrupted"  # study user attr: numbers of trials a killed process left running
GENES = "genes"  # study user attr: the gene names, so a resume with another genome is refused
ITEMS = "items"  # trial user attr: the items it was scored on (its cost), so a resumed budget counts them
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Trial:
    number: int  # the Optuna trial number, unique in the study
    x: np.ndarray  # the genome, within the genome's bounds


class Optimizer(ABC):
    """Proposes genomes and learns from their scores; directions come from the study (one per objective)."""

    def __init__(self, study: optuna.Study, genome: Genome):
        self.study = study
        self.names = list(genome.names)
        self.lower, self.upper = genome.lower, genome.upper
        self.distributions = {
            name: FloatDistribution(float(low), float(high))
            for name, low, high in zip(self.names, self.lower, self.upper, strict=True)
        }
        self._asked: dict[int, optuna.Trial] = {}

    @abstractmethod
    def ask(self) -> Trial:
        """The next genome to evaluate; never waits for other trials' results."""

    @abstractmethod
    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        attrs: Mapping[str, Any] | None = None,
        stopped_at: int | None = None,
    ) -> None:
        """The objective values of trial `number` (None, or any non-finite value: it failed); attrs are
        JSON-serializable user attrs recorded with the trial. `stopped_at`: the item count of the cheaper rung
        the values come from, where the candidate stopped (None: full fidelity)."""

    def note(self, number: int, attrs: Mapping[str, Any]) -> None:
        """Record user attrs on a trial still being evaluated (a rung it finished), for a resumed run to read."""
        trial = self._asked[number]
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    @abstractmethod
    def enqueue(self, x: np.ndarray) -> None:
        """Have `x` asked before anything new (warm start); a genome already in the study is skipped."""

    @property
    def n_done(self) -> int:
        """Trials finished (COMPLETE, PRUNED or FAIL), not counting those a killed process interrupted."""
        interrupted = set(self.study.user_attrs.get(INTERRUPTED, []))
        return sum(t.state in FINISHED and t.number not in interrupted for t in self.study.get_trials(deepcopy=False))

    @property
    def n_failed(self) -> int:
        """Trials that failed, not counting those a killed process interrupted."""
        interrupted = set(self.study.user_attrs.get(INTERRUPTED, []))
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return sum(t.number not in interrupted for t in trials)

    def rung_fitness(self) -> dict[int, list[float]]:
        """Each trial's fitness at every rung it finished (RUNG_FITNESS), unfinished ones too, but not those a
        killed process interrupted: they are asked again and answer from the score cache."""
        interrupted = set(self.study.user_attrs.get(INTERRUPTED, []))
        return {
            t.number: list(t.user_attrs[RUNG_FITNESS])
            for t in self.study.get_trials(deepcopy=False)
            if RUNG_FITNESS in t.user_attrs and t.number not in interrupted
        }

    @property
    def spent(self) -> dict[int, int]:
        """Items each finished trial was scored on, by number: its ITEMS attr, 0 where it has none (a trial a
        killed process interrupted, or one told without it). Trials in flight have spent nothing yet."""
        trials = self.study.get_trials(deepcopy=False, states=FINISHED)
        return {t.number: int(t.user_attrs.get(ITEMS, 0)) for t in trials}

    # --- shared plumbing ------------------------------------------------------------------------------

    def params(self, x: np.ndarray) -> dict[str, float]:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.lower.shape or np.any(x < self.lower) or np.any(x > self.upper):
            raise ValueError(f"expected a genome of shape {self.lower.shape} within the genome's bounds")
        return {name: float(value) for name, value in zip(self.names, x, strict=True)}

    def vector(self, params: Mapping[str, float]) -> np.ndarray:
        return np.array([params[name] for name in self.names], dtype=np.float64)

    def _new_trial(self) -> optuna.Trial:
        trial = self.study.ask(self.distributions)
        self._asked[trial.number] = trial
        return trial

    def _finish(
        self, number: int, values: Sequence[float] | None, attrs: Mapping[str, Any] | None, stopped_at: int | None
    ) -> list[float] | None:
        """Record the outcome in the study; the values, or None when the trial counts as failed."""
        trial = self._asked.pop(number, None)
        if trial is None:
            raise ValueError(f"trial {number} is not waiting for a result from this optimizer")
        for key, value in (attrs or {}).items():
            trial.set_user_attr(key, value)
        if values is not None:
            values = [float(v) for v in values]
            if len(values) != len(self.study.directions):
                raise ValueError(f"trial {number}: expected {len(self.study.directions)} values, got {len(values)}")
        if values is None or not all(np.isfinite(values)):
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        if stopped_at is None:
            self.study.tell(trial, values)
            return values
        if len(values) == 1:  # Optuna keeps intermediate values of one objective only
            trial.report(values[0], step=stopped_at)
        self.study.tell(trial, state=TrialState.PRUNED)
        return values

    def _fail_interrupted(self) -> list[FrozenTrial]:
        """Mark the trials a killed process left RUNNING as FAIL; return them."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in running:
            self.study.tell(trial.number, state=TrialState.FAIL)
        if running:
            earlier = self.study.user_attrs.get(INTERRUPTED, [])
            self.study.set_user_attr(INTERRUPTED, earlier + [t.number for t in running])
        return running


class SamplerOptimizer(Optimizer):
    """An Optuna sampler (NSGA-II, TPE, random) behind the interface: Optuna does the bookkeeping."""

    def __init__(self, study: optuna.Study, genome: Genome, sampler: optuna.samplers.BaseSampler):
        super().__init__(study, genome)
        study.sampler = sampler
        for trial in self._fail_interrupted():
            if set(trial.params) == set(self.names):
                study.enqueue_trial(trial.params)  # re-queued: asked again first, under a new number

    def ask(self) -> Trial:
        trial = self._new_trial()
        return Trial(trial.number, self.vector(trial.params))

    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        attrs: Mapping[str, Any] | None = None,
        stopped_at: int | None = None,
    ) -> None:
        self._finish(number, values, attrs, stopped_at)

    def enqueue(self, x: np.ndarray) -> None:
        self.study.enqueue_trial(self.params(x), skip_if_exists=True)


def open_study(path: Path, name: str, directions: Sequence[str], genome: Genome, resume: bool) -> optuna.Study:
    """The run's study in the sqlite file `path`: created, or (resume) reopened and checked to match."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        # WAL with synchronous=NORMAL survives a killed process (not a power cut) without an fsync per
        # written param: with the default journal, recording a 400-gene trial took seconds instead of ~0.2 s.
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect, so every connection has the pragmas
        exists = name in optuna.study.get_all_study_names(storage)
        study = optuna.create_study(storage=storage, study_name=name, directions=list(directions), load_if_exists=True)
    except DatabaseError as err:
        problem = " ".join(str(err.orig).split())
        raise InputError(
            path, None, f"expected an Optuna sqlite study, got a file that does not open ({problem})"
        ) from None
    if exists and not resume and study.get_trials(deepcopy=False):
        raise InputError(path, name, "the study already has trials: resume it, or choose another output_dir")
    found = [d.name.lower() for d in study.directions]
    if found != list(directions):
        raise InputError(path, name, f"expected a study with directions {list(directions)} (the config's), got {found}")
    if study.user_attrs.get(GENES, genome.names) != genome.names:
        genes = len(study.user_attrs[GENES])
        raise InputError(path, name, f"expected a study of this genome ({genome.dim} genes), got one of {genes} genes")
    study.set_user_attr(GENES, genome.names)
    return study


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
