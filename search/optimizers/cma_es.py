"""CMA-ES (pycma) behind the ask/tell interface, for asynchronous workers and resumable runs.

- Space: pycma searches z in [0, 1]^d (its `bounds` option); gene i = lower_i + z_i (upper_i - lower_i), so
  sigma0 is a fraction of every gene's range whatever the parameter.
- Generations: ask hands out the current generation's candidates one by one. Once all are out but results
  are missing, ask samples spares from the same distribution, so an idle worker never waits for a straggler.
  When popsize results of a generation are in, they are told to pycma together (a failed candidate gets a
  penalty: worse than the generation's worst real value; CMA-ES only uses ranks). Results that arrive
  after that are recorded in the study only.
- Warm start: enqueued genomes are injected into the next generation (pycma `inject`, force) and handed
  out exactly as given.
- Determinism: pycma draws its normal samples from its `randn` option, by default numpy's global RNG; here
  it is the `randn` of the optimizer's own seeded RandomState, so the same seed gives the same asks whatever
  else uses np.random, and the RNG state travels inside the pickled strategy.
- Checkpoint: after every ask and tell, the strategy (with its RNG) and the generation's bookkeeping are
  pickled (atomically) to RUN_DIR/<study>.cmaes.pkl. A resumed optimizer reloads it; candidates a killed
  process left running are handed out again, so the strategy goes on exactly as an uninterrupted run.
"""

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cma
import numpy as np
import optuna
from optuna.trial import TrialState

from search.config import OptimizerConfig
from search.genome import Genome
from search.optimizers.base import Optimizer, Trial


@dataclass
class Member:
    z: np.ndarray  # pycma's proposal in [0, 1]^d; told back to pycma as is
    x: np.ndarray  # the genome evaluated
    kind: str = "sampled"  # "sampled", "warm_start" or "spare"
    number: int | None = None  # the study's trial number once handed out
    done: bool = False
    value: float | None = None  # the minimized objective; None for a failed candidate


@dataclass
class State:
    es: cma.CMAEvolutionStrategy
    genes: list[str]
    generation: list[Member] = field(default_factory=list)
    queue: list[np.ndarray] = field(default_factory=list)  # warm starts waiting for the next generation
    stale: dict[int, Member] = field(default_factory=dict)  # out when their generation was told


class GivenParams(optuna.samplers.BaseSampler):
    """Samples nothing: hands Optuna the genes CMA-ES chose, so the study records them as params."""

    def __init__(self) -> None:
        self.params: dict[str, float] = {}

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: dict) -> dict:
        return {}

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str, param_distribution: Any) -> float:
        return self.params[param_name]


class CmaEs(Optimizer):
    def __init__(self, study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, checkpoint: Path):
        super().__init__(study, genome)
        if len(study.directions) != 1:
            raise ValueError(f"CMA-ES optimizes one objective, got {len(study.directions)}: use nsga2 or random")
        self.sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        self.sampler = study.sampler = GivenParams()
        self.checkpoint = Path(checkpoint)
        self.state = self._load() if self.checkpoint.exists() else self._fresh(options, seed)
        self._recover()
        self._save()

    @property
    def popsize(self) -> int:
        return self.state.es.popsize

    def ask(self) -> Trial:
        member = self._next_member()
        self.sampler.params = self.params(member.x)
        trial = self._new_trial()
        trial.set_user_attr("cma_generation", int(self.state.es.countiter))
        trial.set_user_attr("cma_kind", member.kind)
        member.number = trial.number
        self._save()
        return Trial(trial.number, member.x.copy())

    def tell(self, number: int, values: Sequence[float] | None, attrs: Mapping[str, Any] | None = None) -> None:
        values = self._finish(number, values, attrs)
        member = next((m for m in self.state.generation if m.number == number), None)
        if member is None:
            self.state.stale.pop(number, None)  # its generation was told without it: the study has it
        else:
            member.done, member.value = True, None if values is None else self.sign * values[0]
            self._tell_if_complete()
        self._save()

    def enqueue(self, x: np.ndarray) -> None:
        x = self.vector(self.params(x))  # validated copy
        known = self.state.queue + [m.x for m in self.state.generation]
        known += [self.vector(t.params) for t in self.study.get_trials(deepcopy=False) if len(t.params) == len(x)]
        if not any(np.array_equal(x, other) for other in known):
            self.state.queue.append(x)
            self._save()

    # --- generations ----------------------------------------------------------------------------------

    def _next_member(self) -> Member:
        generation = self.state.generation
        waiting = next((m for m in generation if m.number is None), None)
        if waiting is not None:
            return waiting
        if not generation:
            self._start_generation()
            return generation[0]
        [z] = self.state.es.ask(1)  # a spare from the same distribution
        generation.append(Member(z, self._genome(z), kind="spare"))
        return generation[-1]

    def _start_generation(self) -> None:
        es, queue = self.state.es, self.state.queue
        injected, queue[:] = queue[: es.popsize], queue[es.popsize :]
        if injected:
            es.inject([es.boundary_handler.inverse(self._unit(x)) for x in injected], force=True)
        population = es.ask()
        members = [Member(z, self._genome(z)) for z in population]
        for member, x in zip(members, injected, strict=False):  # pycma puts injected solutions first
            member.x, member.kind = x, "warm_start"
        self.state.generation[:] = members

    def _tell_if_complete(self) -> None:
        generation = self.state.generation
        done = [m for m in generation if m.done]
        if len(done) < self.popsize:
            return
        real = [m.value for m in done if m.value is not None]
        worst = max(real, default=0.0)
        penalty = worst + max(1.0, abs(worst))
        self.state.es.tell([m.z for m in done], [penalty if m.value is None else m.value for m in done])
        self.state.stale.update({m.number: m for m in generation if not m.done and m.number is not None})
        generation.clear()

    # --- space, RNG, checkpoint -----------------------------------------------------------------------

    def _genome(self, z: np.ndarray) -> np.ndarray:
        return np.clip(self.lower + z * (self.upper - self.lower), self.lower, self.upper)

    def _unit(self, x: np.ndarray) -> np.ndarray:
        return (x - self.lower) / (self.upper - self.lower)

    def _fresh(self, options: OptimizerConfig, seed: int) -> State:
        randn = np.random.RandomState(seed % 2**32).randn
        settings = {"bounds": [0, 1], "randn": randn, "seed": np.nan, "verbose": -9}  # nan: never seed numpy
        if options.popsize:
            settings["popsize"] = options.popsize
        es = cma.CMAEvolutionStrategy(np.full(len(self.names), 0.5), options.sigma0, settings)
        return State(es=es, genes=self.names)

    def _load(self) -> State:
        state = pickle.loads(self.checkpoint.read_bytes())
        if state.genes != self.names:
            raise ValueError(f"{self.checkpoint}: CMA-ES checkpoint of another genome ({len(state.genes)} genes)")
        return state

    def _save(self) -> None:
        partial = self.checkpoint.with_name(self.checkpoint.name + ".partial")
        partial.write_bytes(pickle.dumps(self.state))
        os.replace(partial, self.checkpoint)  # atomic: a kill leaves the previous checkpoint whole

    def _recover(self) -> None:
        """Reconcile the checkpoint with the study after a kill: take results the study has that the
        checkpoint missed, and hand out again the candidates that were running."""
        interrupted = {t.number for t in self._fail_interrupted()}
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for member in self.state.generation:
            if member.number is None or member.done:
                continue
            trial = trials.get(member.number)
            if trial is None or member.number in interrupted:
                member.number = None  # re-queued
            elif trial.state == TrialState.COMPLETE:
                member.done, member.value = True, self.sign * trial.values[0]
            elif trial.state == TrialState.FAIL:
                member.done = True
        self.state.stale = {n: m for n, m in self.state.stale.items() if n not in interrupted}
        self._tell_if_complete()


def build(study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, state: Path) -> Optimizer:
    return CmaEs(study, genome, options, seed, state)
