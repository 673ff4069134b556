"""The optimizers on cheap analytic objectives, with real Optuna, pycma and sqlite storage."""

import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from merge_core.errors import InputError
from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import Optimizer, make_optimizer
from search.optimizers.base import INTERRUPTED
from search.run_dir import RunDir

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{part}.weight" for i in range(2) for part in ("mlp.up_proj", "input_layernorm")
]
ALL = ["cmaes", "nsga2", "tpe", "random"]
POPSIZE = 6
TARGET = 0.3


def make_genome(name: str, seed: int = 0, objectives: int = 1, popsize: int = POPSIZE) -> Genome:
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/a"]},
        "merge": {"method": "task_arithmetic"},
        "objectives": [{"task": f"task{i}", "metric": "acc", "direction": "minimize"} for i in range(objectives)],
        "genome": {"filters": ["mlp"]},
        "optimizer": {"name": name, "popsize": popsize, "seed": seed},
    }
    return Genome(SearchConfig.from_dict(data, where="search.yml"), NAMES, 2)


def open_optimizer(run_dir: Path, name: str, resume: bool = False, **genome) -> Optimizer:
    genome = make_genome(name, **genome)
    return make_optimizer(genome.config, genome, RunDir(run_dir), resume=resume)


def sphere(x: np.ndarray) -> float:
    return float(np.sum((x - TARGET) ** 2))


def run(optimizer: Optimizer, trials: int, fail_every: int = 0) -> list[tuple[np.ndarray, float]]:
    history = []
    for _ in range(trials):
        trial = optimizer.ask()
        value = sphere(trial.x)
        failed = fail_every and trial.number % fail_every == fail_every - 1
        optimizer.tell(trial.number, None if failed else [value])
        history.append((trial.x, value))
    return history


def test_genome_has_six_genes():
    assert make_genome("random").dim == 6  # pre, post, mlp x 2 layers, rest x 2 layers


@pytest.mark.parametrize("name", ALL)
def test_improves_on_the_sphere(tmp_path: Path, name: str):
    optimizer = open_optimizer(tmp_path, name)
    history = run(optimizer, 6 * POPSIZE)
    values = [value for _, value in history]
    first, last = values[:POPSIZE], values[-POPSIZE:]
    for x, _ in history:
        assert np.all(x >= optimizer.lower) and np.all(x <= optimizer.upper)
    if name == "random":
        assert min(values) < min(first)  # a baseline only keeps drawing: its best improves
    else:
        assert np.mean(last) < 0.5 * np.mean(first), (first, last)  # the sampling distribution moved


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_the_same_asks(tmp_path: Path, name: str):
    trials = POPSIZE + 2  # into the second generation, which depends on the first one's results
    first = run(open_optimizer(tmp_path / "a", name, seed=7), trials)
    np.random.seed(99)  # other code drawing from numpy's global RNG must not change the search
    np.random.rand(5)
    second = run(open_optimizer(tmp_path / "b", name, seed=7), trials)
    other = run(open_optimizer(tmp_path / "c", name, seed=8), trials)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, second, strict=True))
    assert not all(np.array_equal(a, c) for (a, _), (c, _) in zip(first, other, strict=True))


@pytest.mark.parametrize("name", ALL)
def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path: Path, name: str):
    optimizer = open_optimizer(tmp_path, name)
    run(optimizer, 2 * POPSIZE, fail_every=3)
    trial = optimizer.ask()
    optimizer.tell(trial.number, [math.nan], attrs={"error": "diverged"})
    run(optimizer, POPSIZE, fail_every=3)
    trials = optimizer.study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 3 * POPSIZE + 1
    assert states.count(TrialState.FAIL) == 4 + 1 + 2  # every third of the first 12, the NaN, 2 of the last 6
    assert trials[trial.number].state == TrialState.FAIL and trials[trial.number].user_attrs["error"] == "diverged"
    assert all(t.params.keys() == optimizer.distributions.keys() for t in trials)
    assert optimizer.n_done == len(trials)
    if name == "cmaes":
        assert optimizer.state.es.countiter == 3  # generations with failures were told (with a penalty)


@pytest.mark.parametrize("name", ALL)
def test_resume_continues_numbering_and_requeues_interrupted(tmp_path: Path, name: str):
    optimizer = open_optimizer(tmp_path, name)
    finished = run(optimizer, POPSIZE + 2)
    running = [optimizer.ask(), optimizer.ask()]  # the process dies with these out on workers
    del optimizer
    with pytest.raises(InputError, match="already has trials: resume it"):
        open_optimizer(tmp_path, name, resume=False)

    resumed = open_optimizer(tmp_path, name, resume=True)
    assert resumed.study.user_attrs[INTERRUPTED] == [t.number for t in running]
    assert resumed.n_done == POPSIZE + 2
    again = [resumed.ask(), resumed.ask()]
    assert [t.number for t in again] == [POPSIZE + 4, POPSIZE + 5]  # numbering goes on
    assert all(np.array_equal(a.x, r.x) for a, r in zip(again, running, strict=True))  # re-queued
    for trial in again:
        resumed.tell(trial.number, [sphere(trial.x)])
    later = run(resumed, POPSIZE)
    done = [x for x, _ in finished + [(t.x, 0) for t in again]]
    assert not any(np.array_equal(x, old) for x, _ in later for old in done)  # finished trials not re-asked
    assert resumed.n_done == POPSIZE + 2 + 2 + POPSIZE
    states = [t.state for t in resumed.study.get_trials()]
    assert states.count(TrialState.FAIL) == 2 and TrialState.RUNNING not in states


def test_cma_resumed_from_its_checkpoint_asks_what_an_uninterrupted_run_asks(tmp_path: Path):
    uninterrupted = [x for x, _ in run(open_optimizer(tmp_path / "a", "cmaes", seed=3), 3 * POPSIZE)]

    optimizer = open_optimizer(tmp_path / "b", "cmaes", seed=3)
    asked = [x for x, _ in run(optimizer, POPSIZE + 3)]
    asked += [optimizer.ask().x, optimizer.ask().x]  # killed with two candidates running
    del optimizer
    resumed = open_optimizer(tmp_path / "b", "cmaes", seed=3, resume=True)
    asked_again = [x for x, _ in run(resumed, 3 * POPSIZE - (POPSIZE + 3))]
    np.testing.assert_array_equal(asked[: POPSIZE + 5], uninterrupted[: POPSIZE + 5])
    np.testing.assert_array_equal(asked_again, uninterrupted[POPSIZE + 3 :])


def test_cma_takes_results_the_checkpoint_missed_from_the_study(tmp_path: Path):
    uninterrupted = [x for x, _ in run(open_optimizer(tmp_path / "a", "cmaes", seed=4), 3 * POPSIZE)]

    optimizer = open_optimizer(tmp_path / "b", "cmaes", seed=4)
    run(optimizer, POPSIZE - 1)
    trial = optimizer.ask()
    checkpoint = optimizer.checkpoint
    shutil.copy(checkpoint, tmp_path / "before_tell.pkl")
    optimizer.tell(trial.number, [sphere(trial.x)])  # completes generation 1
    del optimizer
    shutil.copy(tmp_path / "before_tell.pkl", checkpoint)  # killed after the study's tell, before the save
    resumed = open_optimizer(tmp_path / "b", "cmaes", seed=4, resume=True)
    assert resumed.state.es.countiter == 1  # the generation was completed from the study's record
    later = [x for x, _ in run(resumed, 2 * POPSIZE)]
    np.testing.assert_array_equal(later, uninterrupted[POPSIZE:])


def test_cma_hands_out_spares_instead_of_waiting(tmp_path: Path):
    optimizer = open_optimizer(tmp_path, "cmaes", popsize=4)
    trials = [optimizer.ask() for _ in range(6)]
    kinds = [t.user_attrs["cma_kind"] for t in optimizer.study.get_trials()]
    assert kinds == ["sampled"] * 4 + ["spare"] * 2
    assert len({t.x.tobytes() for t in trials}) == 6
    for trial in reversed(trials):  # stragglers finish last
        optimizer.tell(trial.number, [sphere(trial.x)])
    assert optimizer.state.es.countiter == 1  # the first 4 results made one generation
    assert all(t.state == TrialState.COMPLETE for t in optimizer.study.get_trials())
    assert pickle.loads(optimizer.checkpoint.read_bytes()).es.countiter == 1


@pytest.mark.parametrize("name", ALL)
def test_warm_start_asks_the_enqueued_genomes_first_and_once(tmp_path: Path, name: str):
    optimizer = open_optimizer(tmp_path, name)
    defaults = [np.full(6, 1.0), np.full(6, 0.25)]
    for x in defaults:
        optimizer.enqueue(x)
    first = [optimizer.ask() for _ in defaults]
    assert all(np.array_equal(t.x, x) for t, x in zip(first, defaults, strict=True))
    for trial in first:
        optimizer.tell(trial.number, [sphere(trial.x)])
    for x in defaults:
        optimizer.enqueue(x)  # a resumed run enqueuing its defaults again: already in the study
    following = optimizer.ask()
    assert not any(np.array_equal(following.x, x) for x in defaults)
    with pytest.raises(ValueError, match="within the genome's bounds"):
        optimizer.enqueue(np.full(6, 1.5))


def test_nsga2_finds_a_pareto_front_queryable_from_the_storage(tmp_path: Path):
    optimizer = open_optimizer(tmp_path, "nsga2", objectives=2, popsize=8)
    for _ in range(48):
        trial = optimizer.ask()
        optimizer.tell(trial.number, [float(np.sum((trial.x - 0.2) ** 2)), float(np.sum((trial.x - 0.8) ** 2))])
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    front = study.best_trials
    assert len(front) >= 3
    complete = [t.values for t in study.get_trials(states=(TrialState.COMPLETE,))]
    for member in front:
        dominated = any(
            all(o <= m for o, m in zip(other, member.values, strict=True)) and other != member.values
            for other in complete
        )
        assert not dominated
    assert {t.number for t in front} == {t.number for t in optimizer.study.best_trials}


def test_resume_with_another_genome_is_refused(tmp_path: Path):
    run(open_optimizer(tmp_path, "random"), 2)
    data = make_genome("random").config.model_dump(mode="json")
    data["genome"]["filters"] = ["input_layernorm"]
    config = SearchConfig.from_dict(data, where="search.yml")
    genome = Genome(config, NAMES, 2)
    with pytest.raises(
        InputError, match=r"optuna\.db: search: expected a study of this genome \(6 genes\), got one of"
    ):
        make_optimizer(config, genome, RunDir(tmp_path), resume=True)
