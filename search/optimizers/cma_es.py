"""CMA-ES (pycma) behind the ask/tell interface, for asynchronous workers and resumable runs.

- Space: pycma searches z in [0, 1]^d (its `bounds` option); gene i = lower_i + z_i (upper_i - lower_i), so
  sigma0 is a fraction of every gene's range whatever the parameter.
- Generations: ask hands out the current generation's candidates one by one. Once all are out but results
  are missing, ask samples spares from the same distribution, so an idle worker never waits for a straggler.
  When popsize results of a generation are in, they are told to pycma together (as ranks, which is all CMA-ES
  uses: a candidate stopped at a cheaper rung below every one that went further, a failed one last). Results that arrive
  after that are recorded in the study only.
- Warm start: enqueued genomes are injected into the next generation (pycma `inject`, force) and handed
  out exactly as given; pycma asks them after its own directions (`DirectionData`), before samples.
- Coarse to fine (optimizer.coarse_to_fine): the genomes queued before the first generation (stage 1's
  one-knob grid, search/genome/coarse.py, and the warm starts) are handed out first as a "coarse" generation
  that pycma is never told; once all are in, the strategy's mean moves to the best of them, as if it had
  been started there, and sampling begins. So stage 2 starts where the best one-knob merge ends.
- Separable (optimizer.covariance: diagonal, and auto above DIAGONAL_ABOVE genes): pycma's CMA_diagonal, a
  variance per gene in sigma_vec and a constant standard-normal sampler, so the state file holds no C, B, D
  (`_fields`).
- Determinism: pycma draws its normal samples from its `randn` option, by default numpy's global RNG; here
  it is the `randn` of the optimizer's own seeded RandomState, so the same seed gives the same asks whatever
  else uses np.random.
- Checkpoint: after every ask and tell, RUN_DIR/<study>.cmaes.json (RunDir.optimizer_state, written
  atomically) holds the state as plain JSON: numbers, strings and lists. It is never a pickle, because
  unpickling runs code: whoever can write a shared run dir could run theirs as the next user who resumes.
  It holds pycma's strategy as of the start of the current generation (`STRATEGY`: mean, step size,
  covariance C with the eigen-decomposition B, D that sampling uses and when the next one is due, the
  evolution path pc, the counters, sigma_vec; the step-size adaptation's state, CSA's path ps; the
  directions pycma samples first: selective mirrors), the RNG's state at that
  same point, and the generation's bookkeeping: each candidate's z and genome, kind, trial number and
  result, the queued warm starts, and the candidates still out when their generation was told.
- Resume: a fresh strategy is built from the same options, the stored attributes are checked (format, genes,
  popsize, shapes, finite numbers; a file that does not fit is refused with an InputError and left as it is)
  and set on it, and the current generation is asked again from its start. So pycma rebuilds its own record
  of what it sent and injected, the RNG ends where it was, and the candidates must come out equal to the
  stored ones. Candidates a killed process left running are handed out again, so the strategy goes on
  exactly as an uninterrupted run.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Literal

import cma
import numpy as np
import optuna
from cma.sampler import GaussStandardConstant
from cma.sigma_adaptation import CMAAdaptSigmaCSA
from cma.transformations import DiagonalDecoding
from cma.utilities.utils import ElapsedWCTime
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_core.errors import InputError, from_validation, shown
from search.config import OptimizerConfig
from search.genome import Genome
from search.optimizers.base import Optimizer, Trial
from search.run_dir import write_atomically

# covariance auto: full up to this many genes, diagonal above. Measured at an equal item budget of 60 candidates
# (experiments/RESULTS.md): at 30 genes full was ahead on 3 of 3 families, at 66 diagonal was ahead on 3 of 3;
# where between them the two cross is not measured.
DIAGONAL_ABOVE = 40

FORMAT = 1  # of the state file; bump when its meaning changes, so an old file is refused, not misread

# The attributes of a CMAEvolutionStrategy that change over a run and decide its next proposals (file key:
# attribute, type), found by diffing a fresh strategy against one many generations on and reading where ask and
# tell use each difference; besides these, sigma_vec (per-coordinate scales, `_restore`) and the directions
# pycma samples first (`DirectionData`). The rest follows from the options (weights, learning rates, bounds),
# is pycma's copy of these (es.B, es.C, es.D, es.dC: the sampler's), is set in tell before it is read, only
# feeds stop() and result (fit histories, best), which this optimizer never consults, or is never read under
# these options (pc2: diagonal decoding is off).
STRATEGY = {
    "countiter": ("countiter", int),
    "countevals": ("countevals", int),
    "mean": ("mean", np.ndarray),
    "mean_old": ("mean_old", np.ndarray),  # before the last tell
    "sigma": ("sigma", float),
    "pc": ("pc", np.ndarray),  # evolution path of the covariance (rank-one update)
    "C": ("sm.C", np.ndarray),  # the covariance
    "B": ("sm.B", np.ndarray),  # its eigenvectors and their scales, as of the last decomposition: what sampling uses
    "D": ("sm.D", np.ndarray),
    "count_tell": ("sm.count_tell", int),  # updates of C, and the one decomposed last: the next decomposition is
    "last_update": ("sm.last_update", int),  # due when they are far enough apart (pycma decomposes lazily)
    "count_eigen": ("sm.count_eigen", int),
}
# The step-size adaptation's own state: CSA's evolution path (CSA is forced, see `_fresh`).
STEP_SIZE = {"ps": ("adapt_sigma.ps", np.ndarray)}


def _fields(es: cma.CMAEvolutionStrategy) -> dict[str, tuple[str, type]]:
    """Separable CMA-ES samples from a constant standard normal (es.sm) and keeps its diagonal covariance in
    sigma_vec: the sampler has no state of its own."""
    if isinstance(es.sm, GaussStandardConstant):
        return {name: spec for name, spec in {**STRATEGY, **STEP_SIZE}.items() if not spec[0].startswith("sm.")}
    return {**STRATEGY, **STEP_SIZE}


@dataclass
class Member:
    z: np.ndarray  # pycma's proposal in [0, 1]^d; told back to pycma as is
    x: np.ndarray  # the genome evaluated
    kind: str = "sampled"  # "sampled", "warm_start", "spare" or "coarse"
    number: int | None = None  # the study's trial number once handed out
    done: bool = False
    value: float | None = None  # the minimized objective; None for a failed candidate
    stopped_at: int | None = None  # the item count of the cheaper rung its value is from (None: full fidelity)


@dataclass
class State:
    es: cma.CMAEvolutionStrategy
    rng: np.random.RandomState  # the one pycma's randn draws from
    start: dict[str, Any]  # es and rng as data (`_snapshot`), as of the start of the current generation
    generation: list[Member] = field(default_factory=list)
    queue: list[np.ndarray] = field(default_factory=list)  # warm starts waiting for the next generation
    stale: dict[int, Member] = field(default_factory=dict)  # out when their generation was told
    centred: bool = False  # the coarse stage is over (or was never asked for)


# --- the state file ----------------------------------------------------------------------------------
# Types here; shapes, bounds and finiteness in CmaEs._load and its helpers, which know the genome and the fresh
# strategy.


class Data(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MemberData(Data):
    z: list[float]
    x: list[float]
    kind: Literal["sampled", "warm_start", "spare", "coarse"]
    number: int | None
    done: bool
    value: float | None
    stopped_at: int | None = None


class DirectionData(Data):
    """What pycma's tell prepares for the next ask to sample first (es.pop_injection_directions): selective mirrors
    of the worst (CMA_mirrors: populations under 6);
    and which of the last population were mirrors, not to be mirrored back (es._indices_of_selective_mirrors)."""

    vectors: list[list[float]]
    mirrors: list[int]


class RngData(Data):
    """numpy's RandomState.get_state() of its MT19937 generator."""

    key: Annotated[list[Annotated[int, Field(ge=0, lt=2**32)]], Field(min_length=624, max_length=624)]
    pos: int = Field(ge=0, le=624)
    has_gauss: Literal[0, 1]
    cached_gaussian: float


class StateData(Data):
    format: int
    genes: list[str]
    popsize: int
    sigma0: float
    covariance: Literal["full", "diagonal"] = "full"  # files written before separable CMA-ES existed: full
    strategy: dict[str, Any]  # `_fields` and sigma_vec, checked against the fresh strategy in CmaEs._restore
    directions: DirectionData
    rng: RngData
    generation: list[MemberData]
    queue: list[list[float]]
    stale: list[MemberData]
    centred: bool = True  # files written before coarse-to-fine existed never had a coarse stage


def _snapshot(es: cma.CMAEvolutionStrategy, rng: np.random.RandomState) -> dict[str, Any]:
    """The strategy's `_fields`, sigma_vec, directions and the RNG's state, as JSON data."""
    _, key, pos, has_gauss, cached_gaussian = rng.get_state()
    return {
        "strategy": {
            **{name: np.asarray(attrgetter(attribute)(es)).tolist() for name, (attribute, _) in _fields(es).items()},
            "sigma_vec": np.broadcast_to(es.sigma_vec.scaling, es.mean.shape).tolist(),  # a scalar 1 until it adapts
        },
        "directions": {
            "vectors": [vector.tolist() for vector in es.pop_injection_directions],
            "mirrors": list(es._indices_of_selective_mirrors),
        },
        "rng": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
    }


def _member_data(member: Member) -> dict[str, Any]:
    return {
        "z": member.z.tolist(),
        "x": member.x.tolist(),
        "kind": member.kind,
        "number": member.number,
        "done": member.done,
        "value": member.value,
        "stopped_at": member.stopped_at,
    }


def _rank_key(member: Member) -> tuple[bool, float, float]:
    """Sorts best first (pycma minimizes): real before failed, further rungs first, then by value."""
    if member.value is None:
        return (True, 0.0, 0.0)
    reached = float("inf") if member.stopped_at is None else member.stopped_at
    return (False, -reached, member.value)


def _same_candidate(a: Member, b: Member) -> bool:
    return a.kind == b.kind and np.array_equal(a.z, b.z) and np.array_equal(a.x, b.x)


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
        self.covariance = covariance(options, genome.dim)
        self.state = self._fresh(options, seed)
        self.state.centred = not options.coarse_to_fine
        if self.checkpoint.exists():
            self._load()  # into the fresh strategy: its options give pycma's constants and shapes
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

    def tell(
        self,
        number: int,
        values: Sequence[float] | None,
        attrs: Mapping[str, Any] | None = None,
        stopped_at: int | None = None,
    ) -> None:
        values = self._finish(number, values, attrs, stopped_at)
        member = next((m for m in self.state.generation if m.number == number), None)
        if member is None:
            self.state.stale.pop(number, None)  # its generation was told without it: the study has it
        else:
            member.done, member.value = True, None if values is None else self.sign * values[0]
            member.stopped_at = stopped_at
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
        if not generation and not self.state.centred and self.state.queue:
            generation[:] = [Member(self._unit(x), x, kind="coarse") for x in self.state.queue]
            self.state.queue.clear()
            return generation[0]
        if not generation:
            self.state.centred = True  # nothing was queued for a coarse stage
            generation[:] = self._sample(self.state.queue)
            return generation[0]
        generation.append(self._spare())
        return generation[-1]

    def _sample(self, queue: list[np.ndarray]) -> list[Member]:
        """A new generation from pycma, with as many warm starts taken from `queue` as fit in it."""
        es = self.state.es
        directions = len(es.pop_injection_directions)  # pycma asks these first, then the injected, then samples
        injected, queue[:] = queue[: es.popsize - directions], queue[es.popsize - directions :]
        if injected:
            es.inject([es.boundary_handler.inverse(self._unit(x)) for x in injected], force=True)
        members = [Member(z, self._genome(z)) for z in es.ask()]
        for member, x in zip(members[directions:], injected, strict=False):
            member.x, member.kind = x, "warm_start"
        return members

    def _spare(self) -> Member:
        [z] = self.state.es.ask(1)  # from the same distribution as the generation
        return Member(z, self._genome(z), kind="spare")

    def _tell_if_complete(self) -> None:
        generation = self.state.generation
        done = [m for m in generation if m.done]
        if generation and generation[0].kind == "coarse":
            if all(m.done for m in generation if m.kind == "coarse"):
                self._centre(min(done, key=_rank_key))
            return
        if len(done) < self.popsize:
            return
        # pycma uses only the ranks of what it is told: a candidate that stopped at a cheaper rung ranks below
        # every one that went further (values of different rungs are never compared), a failed one last.
        # Ties keep one rank, as equal values did (pycma reads a flat generation as a cue to widen its step).
        keys = [_rank_key(m) for m in done]
        self.state.es.tell([m.z for m in done], [float(sum(other < key for other in keys)) for key in keys])
        self._next_generation()

    def _centre(self, best: Member) -> None:
        """End the coarse stage: the mean moves to its best candidate (left where it was if all failed)."""
        es = self.state.es
        if best.value is not None:
            es.mean = es.boundary_handler.inverse(self._unit(best.x))
            es.mean_old, es.mean_after_tell = es.mean.copy(), es.mean.copy()  # as a fresh strategy there has them
        self.state.centred = True
        self._next_generation()

    def _next_generation(self) -> None:
        """The current generation is over: snapshot the strategy the next one starts from."""
        generation = self.state.generation
        self.state.start = _snapshot(self.state.es, self.state.rng)
        self.state.stale.update({m.number: m for m in generation if not m.done and m.number is not None})
        generation.clear()

    # --- space, RNG, checkpoint -----------------------------------------------------------------------

    def _genome(self, z: np.ndarray) -> np.ndarray:
        return np.clip(self.lower + z * (self.upper - self.lower), self.lower, self.upper)

    def _unit(self, x: np.ndarray) -> np.ndarray:
        return (x - self.lower) / (self.upper - self.lower)

    def _fresh(self, options: OptimizerConfig, seed: int) -> State:
        rng = np.random.RandomState(seed % 2**32)
        settings = {
            "bounds": [0, 1],
            "randn": rng.randn,
            "seed": np.nan,  # never seed numpy's global RNG
            "verbose": -9,
            # pycma's default [1e8, 1e12] moves an ill-conditioned covariance into sigma_vec (which the state file
            # keeps) and, past condition 1e12, into a geno-pheno transformation (which it does not): only the first.
            "conditioncov_alleviate": [1e8, 0],
            # CSA at every size: pycma would switch to TPA from 300 genes, which needs its pair of samples told
            # first and as given, and asynchronous workers return stragglers and warm starts in any order.
            "AdaptSigma": CMAAdaptSigmaCSA,
            "CMA_diagonal": self.covariance == "diagonal",
        }
        if options.popsize:
            settings["popsize"] = options.popsize
        es = cma.CMAEvolutionStrategy(np.full(len(self.names), 0.5), options.sigma0, settings)
        # Created in pycma's first generation and read in later ones before they are set: set now, so a strategy
        # restored past the first has them too (a wall-clock timer, the mean before the last tell, the mirrors).
        es.timer, es.mean_old, es._indices_of_selective_mirrors = ElapsedWCTime(), es.mean.copy(), []
        return State(es, rng, _snapshot(es, rng))

    def _save(self) -> None:
        state = self.state
        data = {
            "format": FORMAT,
            "genes": self.names,
            "popsize": state.es.popsize,
            "sigma0": state.es.sigma0,
            "covariance": self.covariance,
            **state.start,
            "generation": [_member_data(m) for m in state.generation],
            "queue": [x.tolist() for x in state.queue],
            "stale": [_member_data(m) for m in state.stale.values()],
            "centred": state.centred,
        }
        write_atomically(self.checkpoint, json.dumps(data, allow_nan=False))  # a kill leaves the old file whole

    def _load(self) -> None:
        """Set the stored state on the fresh one; a file that does not fit this search is refused."""
        data, state = self._read(), self.state
        self._expect_this_search(data)
        self._restore(data.strategy, data.directions, data.rng)
        state.queue = [self._genes(x, f"queue[{i}]") for i, x in enumerate(data.queue)]
        state.stale = {m.number: m for m in (self._member(m, f"stale[{i}]") for i, m in enumerate(data.stale))}
        state.centred = data.centred
        self._replay([self._member(m, f"generation[{i}]") for i, m in enumerate(data.generation)])

    def _expect_this_search(self, data: StateData) -> None:
        es = self.state.es
        expected = {
            "genes": (self.names, f"the {len(self.names)} genes of this search's genome"),
            "popsize": (es.popsize, f"{es.popsize}, this search's population size"),
            "sigma0": (es.sigma0, f"{es.sigma0}, this search's optimizer.sigma0"),
            "covariance": (self.covariance, f"{self.covariance}, this search's optimizer.covariance"),
        }
        for name, (ours, wanted) in expected.items():
            if getattr(data, name) != ours:
                raise InputError(self.checkpoint, name, f"expected {wanted}, got {shown(getattr(data, name))}")

    def _restore(self, strategy: dict[str, Any], directions: DirectionData, rng: RngData) -> None:
        """Set the stored strategy, directions and RNG state on the fresh strategy, each checked against it."""
        es, fields = self.state.es, _fields(self.state.es)
        self._expect_keys(strategy, [*fields, "sigma_vec"])
        for name, (attribute, kind) in fields.items():
            path, _, leaf = attribute.rpartition(".")
            owner = attrgetter(path)(es) if path else es
            setattr(owner, leaf, self._like(kind, getattr(owner, leaf), strategy[name], f"strategy.{name}"))
        es._updateBDfromSM()  # es.B, es.C, es.D, es.dC are pycma's copies of the sampler's: refresh them
        es.mean_after_tell[:] = es.mean  # as every tell leaves it
        # Scales pycma moves out of C when a std leaves [minstd, maxstd] or C's diagonal grows ill-conditioned; as
        # a vector even when all ones (a scalar 1 in a fresh strategy): pycma computes the same with either.
        es.sigma_vec = DiagonalDecoding(self._array(strategy["sigma_vec"], self.lower.shape, "strategy.sigma_vec"))
        es.pop_injection_directions = self._directions(directions)
        es._indices_of_selective_mirrors = directions.mirrors
        self._array(rng.cached_gaussian, (), "rng.cached_gaussian")
        self.state.rng.set_state(
            ("MT19937", np.array(rng.key, dtype=np.uint32), rng.pos, rng.has_gauss, rng.cached_gaussian)
        )
        self.state.start = _snapshot(es, self.state.rng)

    def _expect_keys(self, strategy: dict[str, Any], expected: list[str]) -> None:
        missing = [name for name in expected if name not in strategy]
        if missing:
            raise InputError(self.checkpoint, f"strategy.{missing[0]}", "expected a value, got nothing")
        unknown = [name for name in strategy if name not in expected]
        if unknown:
            raise InputError(
                self.checkpoint, f"strategy.{unknown[0]}", f"unknown key; expected one of: {', '.join(expected)}"
            )

    def _directions(self, directions: DirectionData) -> list[np.ndarray]:
        es = self.state.es
        most = es.sp.lam_mirr  # the selective mirrors (CSA: no sample pair along the mean shift)
        if len(directions.vectors) > most:
            raise InputError(
                self.checkpoint, "directions.vectors", f"expected at most {most}, got {len(directions.vectors)}"
            )
        return [self._array(y, self.lower.shape, f"directions.vectors[{i}]") for i, y in enumerate(directions.vectors)]

    def _read(self) -> StateData:
        try:
            data = json.loads(self.checkpoint.read_text())
        except ValueError:  # UnicodeDecodeError is one too
            raise InputError(
                self.checkpoint, None, "expected CMA-ES state as JSON, got a file that does not parse"
            ) from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise InputError(self.checkpoint, "format", f"expected CMA-ES state format {FORMAT}, got {found!r}")
        try:
            return StateData.model_validate(data)
        except ValidationError as err:
            raise from_validation(err, str(self.checkpoint), StateData) from None

    def _replay(self, stored: list[Member]) -> None:
        """Ask pycma for the stored generation again, from the strategy and RNG as of its start: so pycma rebuilds
        its own record of what it sent and injected, the RNG ends where it was, and the stored ones are checked."""
        if not stored:
            return
        population = len(stored) - sum(m.kind == "spare" for m in stored)
        if stored[0].kind == "coarse":
            asked = [Member(self._unit(m.x), m.x, kind="coarse") for m in stored if m.kind == "coarse"]
        elif population != self.popsize:
            raise InputError(
                self.checkpoint, "generation", f"expected {self.popsize} candidates besides spares, got {population}"
            )
        else:
            asked = self._sample([m.x for m in stored if m.kind == "warm_start"])  # takes them all, as it did
        asked += [self._spare() for m in stored if m.kind == "spare"]
        for i, (mine, again) in enumerate(zip(stored, asked, strict=True)):
            if not _same_candidate(mine, again):
                raise InputError(
                    self.checkpoint,
                    f"generation[{i}]",
                    "expected the candidate the stored strategy proposes, got another",
                )
        self.state.generation[:] = stored

    def _member(self, data: MemberData, field: str) -> Member:
        value = None if data.value is None else float(self._array(data.value, (), f"{field}.value"))
        z = self._array(data.z, self.lower.shape, f"{field}.z")
        genes = self._genes(data.x, f"{field}.x")
        return Member(z, genes, data.kind, data.number, data.done, value, data.stopped_at)

    def _genes(self, value: list[float], field: str) -> np.ndarray:
        x = self._array(value, self.lower.shape, field)
        if np.any(x < self.lower) or np.any(x > self.upper):
            raise InputError(self.checkpoint, field, "expected a genome within the genome's bounds, got one outside")
        return x

    def _like(self, kind: type, current: Any, value: Any, field: str) -> Any:
        """`value` checked to be a `kind` as pycma holds in `current`: an integer, a finite number, or finite numbers
        of its shape laid out in memory as it is (pycma keeps B in Fortran order): BLAS sums a product in another
        order for another layout, so the last bits of every later proposal depend on it."""
        if kind is int:
            if type(value) is not int:
                raise InputError(self.checkpoint, field, f"expected an integer, got {shown(value)}")
            return value
        if kind is float:
            return float(self._array(value, (), field))
        array = self._array(value, np.shape(current), field)
        return np.asarray(array, order="F" if current.flags.f_contiguous and not current.flags.c_contiguous else "C")

    def _array(self, value: Any, shape: tuple[int, ...], field: str) -> np.ndarray:
        """`value` as a float array of `shape`, every entry finite; or the InputError saying what came instead."""
        wanted = f"{'x'.join(map(str, shape))} finite numbers" if shape else "a finite number"
        try:
            array = np.asarray(value)
            numeric = array.dtype.kind in "iuf"
        except ValueError:  # lists of unequal lengths
            numeric = False
        if not numeric:
            raise InputError(self.checkpoint, field, f"expected {wanted}, got {shown(value)}")
        if array.shape != shape:
            got = "x".join(map(str, array.shape)) or "one number"
            raise InputError(self.checkpoint, field, f"expected {wanted}, got {got}")
        if not np.all(np.isfinite(array)):
            raise InputError(
                self.checkpoint, field, f"expected {wanted}, got {shown(value) if not shape else 'non-finite ones'}"
            )
        return array.astype(np.float64)

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


def covariance(options: OptimizerConfig, genes: int) -> Literal["full", "diagonal"]:
    if options.covariance != "auto":
        return options.covariance
    return "diagonal" if genes > DIAGONAL_ABOVE else "full"


def build(study: optuna.Study, genome: Genome, options: OptimizerConfig, seed: int, state: Path) -> Optimizer:
    return CmaEs(study, genome, options, seed, state)
