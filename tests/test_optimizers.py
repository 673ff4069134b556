"""The optimizers on cheap analytic objectives, with real Optuna, pycma and sqlite storage."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from merge_core.errors import InputError
from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import OPTIMIZERS, Optimizer, advice, check_fits, gp, make_optimizer
from search.optimizers.base import INTERRUPTED
from search.run_dir import RunDir

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{part}.weight" for i in range(2) for part in ("mlp.up_proj", "input_layernorm")
]
ALL = ["cmaes", "nsga2", "tpe", "gp", "random"]
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
    trials = 12  # into the second generation, and past TPE's and the GP's 10 random startup trials
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
    shutil.copy(checkpoint, tmp_path / "before_tell.json")
    optimizer.tell(trial.number, [sphere(trial.x)])  # completes generation 1
    del optimizer
    shutil.copy(tmp_path / "before_tell.json", checkpoint)  # killed after the study's tell, before the save
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
    assert json.loads(optimizer.checkpoint.read_text())["strategy"]["countiter"] == 1


def cma_schedule(rounds: int, popsize: int) -> list[tuple[str, object]]:
    """Warm starts, then rounds of one generation each: its candidates asked and told one by one but for a
    straggler, a spare asked and told (which completes the generation), then the straggler's (stale) result.
    The straggler moves through the population, one in 7 candidates fails, a warm start comes mid-run."""
    ops: list[tuple[str, object]] = [("enqueue", np.full(6, 1.0)), ("enqueue", np.full(6, 0.25))]
    for number in range(rounds):
        if number == rounds // 2:
            ops.append(("enqueue", np.full(6, 0.75)))
        first, straggler = number * (popsize + 1), number % popsize
        for i in range(popsize):
            ops += [("ask", None)] + ([] if i == straggler else [("tell", first + i)])
        ops += [("ask", None), ("tell", first + popsize), ("tell", first + straggler)]
    return ops


def play(optimizer: Optimizer, ops: list[tuple[str, object]], reopen=None) -> list[np.ndarray]:
    """The candidates asked, in order. With `reopen`, the process is killed after every operation and the
    optimizer reopened from disk; the candidates it had out are asked for again: those of the current
    generation must come back as they were, those of a generation already told are lost (as when killed)."""
    asked: list[np.ndarray] = []
    out: dict[int, tuple[int, int]] = {}  # ask index -> (trial number, generation) of the candidates out
    for op, arg in ops:
        if op == "enqueue":
            optimizer.enqueue(arg)
        elif op == "ask":
            trial = optimizer.ask()
            out[len(asked)] = trial.number, optimizer.state.es.countiter
            asked.append(trial.x)
        elif arg in out:
            number, _ = out.pop(arg)
            optimizer.tell(number, None if arg % 7 == 3 else [sphere(asked[arg])])
        if reopen is not None:
            optimizer = reopen()
            generation = optimizer.state.es.countiter
            for index, (_, asked_in) in sorted(out.items()):
                if asked_in != generation:
                    del out[index]
                    continue
                trial = optimizer.ask()
                np.testing.assert_array_equal(trial.x, asked[index])
                out[index] = trial.number, generation
    return asked


def open_cma(run_dir: Path, resume: bool = False, layers: int = 2, coarse: bool = False) -> Optimizer:
    """CMA-ES with a population under 6 (so pycma asks selective mirrors) and sigma0 above its maxstd, a third
    of the range (so it adapts sigma_vec), over 2 + 2 * layers genes: the state a resume must carry in full."""
    data = make_genome("cmaes", seed=11, popsize=4).config.model_dump(mode="json")
    data["optimizer"]["sigma0"] = 0.5
    data["optimizer"]["coarse_to_fine"] = coarse
    config = SearchConfig.from_dict(data, where="search.yml")
    names = NAMES[:3] + [
        f"model.layers.{i}.{p}.weight" for i in range(layers) for p in ("mlp.up_proj", "input_layernorm")
    ]
    return make_optimizer(config, Genome(config, names, layers), RunDir(run_dir), resume=resume)


# Stragglers are some rounds' first candidates, directions pycma injected: it warns that one is never told.
# The resumed run must do the same, warnings and all.
@pytest.mark.filterwarnings("ignore::cma.evolution_strategy.InjectionWarning")
def test_cma_reopened_from_disk_after_every_ask_and_tell_asks_what_an_uninterrupted_run_asks(tmp_path: Path):
    rounds = 15
    popsize = 4  # a small population: every reopen costs Optuna ~0.2 s
    ops = cma_schedule(rounds, popsize)
    uninterrupted = open_cma(tmp_path / "a")
    expected = play(uninterrupted, ops)
    directions = []

    def reopen() -> Optimizer:
        optimizer = open_cma(tmp_path / "b", resume=True)
        directions.append(len(json.loads(optimizer.checkpoint.read_text())["directions"]["vectors"]))
        return optimizer

    reopened = play(open_cma(tmp_path / "b"), ops, reopen)
    assert len(reopened) == len(expected) == rounds * (popsize + 1)
    for i, (x, y) in enumerate(zip(reopened, expected, strict=True)):
        assert np.array_equal(x, y), f"candidate {i} differs"
    final, es = reopen().state.es, uninterrupted.state.es
    assert type(es.adapt_sigma).__name__ == "CMAAdaptSigmaCSA"
    assert final.countiter == es.countiter == rounds
    assert final.sm.count_eigen == es.sm.count_eigen >= rounds - 2  # B and D were recomputed on the way
    np.testing.assert_array_equal(final.mean, es.mean)
    assert np.all(es.sigma_vec.scaling < 1)  # adapted
    assert max(directions) == 1  # a mirror
    kinds = [t.user_attrs["cma_kind"] for t in uninterrupted.study.get_trials()]
    assert kinds.count("warm_start") == 3 and kinds.count("spare") == rounds


def test_cma_resumed_between_lazy_eigendecompositions_asks_what_an_uninterrupted_run_asks(tmp_path: Path):
    """With 40 genes pycma decomposes C only every other generation or so (the cost is cubic): a resume must
    bring back the B and D that sampling still uses, and when the next decomposition is due."""
    generations, popsize = 10, 4
    expected = [x for x, _ in run(open_cma(tmp_path / "a", layers=19), generations * popsize)]
    optimizer, asked, kept = open_cma(tmp_path / "b", layers=19), [], 0
    for _ in range(generations):
        asked += [x for x, _ in run(optimizer, popsize)]  # one generation, told at its last result
        optimizer = open_cma(tmp_path / "b", resume=True, layers=19)
        sm = optimizer.state.es.sm
        kept += sm.count_tell < sm.last_update + sm.lazy_update_gap  # the next generation samples with old B, D
    assert optimizer.state.es.N == 40 and kept >= generations // 3
    np.testing.assert_array_equal(asked, expected)


def test_cma_warm_start_after_selective_mirrors_is_told_to_pycma_as_itself(tmp_path: Path):
    optimizer = open_cma(tmp_path)
    while not optimizer.state.es.pop_injection_directions:  # a generation that starts with a mirror
        run(optimizer, optimizer.popsize)
    optimizer.enqueue(np.full(6, 0.75))
    trials = [optimizer.ask() for _ in range(optimizer.popsize)]
    members = optimizer.state.generation
    assert [m.kind for m in members] == ["sampled", "warm_start", "sampled", "sampled"]  # after the mirror
    np.testing.assert_array_equal(trials[1].x, np.full(6, 0.75))
    np.testing.assert_allclose(optimizer._genome(members[1].z), trials[1].x, atol=1e-12)  # its z is the genome's


def coarse_schedule(rounds: int, popsize: int) -> list[tuple[str, object]]:
    """Three queued genomes (the middle one at the sphere's optimum), asked with a spare before any result;
    the spare told first, then the coarse ones; then `rounds` generations asked and told in order."""
    ops: list[tuple[str, object]] = [("enqueue", np.full(6, v)) for v in (0.9, TARGET, 0.6)]
    ops += [("ask", None)] * 4 + [("tell", i) for i in (3, 0, 1, 2)]
    for number in range(rounds):
        first = 4 + number * popsize
        ops += [("ask", None)] * popsize + [("tell", first + i) for i in range(popsize)]
    return ops


def test_cma_coarse_stage_is_asked_first_and_moves_the_mean_to_its_best(tmp_path: Path):
    optimizer = open_cma(tmp_path, coarse=True)
    start = optimizer.state.es.mean.copy()
    asked = play(optimizer, coarse_schedule(0, optimizer.popsize))
    kinds = [t.user_attrs["cma_kind"] for t in optimizer.study.get_trials()]
    assert kinds == ["coarse"] * 3 + ["spare"]
    np.testing.assert_array_equal(asked[:3], [np.full(6, v) for v in (0.9, TARGET, 0.6)])
    es = optimizer.state.es
    assert es.countiter == 0 and optimizer.state.centred  # pycma was told nothing: only its mean moved
    np.testing.assert_allclose(es.boundary_handler.transform(es.mean), np.full(6, TARGET), atol=1e-12)
    assert not np.allclose(start, es.mean)
    trials = [optimizer.ask() for _ in range(optimizer.popsize)]
    assert [m.kind for m in optimizer.state.generation] == ["sampled"] * optimizer.popsize
    # sampled around the coarse winner: sigma 0.5 of the range, so only on average near it
    assert abs(np.mean([t.x for t in trials]) - TARGET) < abs(np.mean(start) - TARGET)


def test_cma_without_coarse_stage_injects_the_queue_into_its_first_generation(tmp_path: Path):
    optimizer = open_cma(tmp_path)
    for v in (0.9, TARGET):
        optimizer.enqueue(np.full(6, v))
    [optimizer.ask() for _ in range(optimizer.popsize)]
    assert [m.kind for m in optimizer.state.generation] == ["warm_start"] * 2 + ["sampled"] * 2


def test_cma_reopened_during_and_after_the_coarse_stage_asks_what_an_uninterrupted_run_asks(tmp_path: Path):
    ops = coarse_schedule(4, 4)
    expected = play(open_cma(tmp_path / "a", coarse=True), ops)
    reopened = play(open_cma(tmp_path / "b", coarse=True), ops, lambda: open_cma(tmp_path / "b", True, coarse=True))
    assert len(reopened) == len(expected) == 4 + 4 * 4
    np.testing.assert_array_equal(reopened, expected)


def test_cma_state_is_plain_json_data(tmp_path: Path):
    optimizer = open_optimizer(tmp_path, "cmaes", seed=5)
    run(optimizer, 3 * POPSIZE + 2)  # three generations told, two candidates of the fourth done
    optimizer.enqueue(np.full(6, 0.75))
    path = RunDir(tmp_path).optimizer_state("search")
    assert optimizer.checkpoint == path and path.name == "search.cmaes.json"

    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-finite {name} in the state"))
    strategy, rng, es = data["strategy"], data["rng"], optimizer.state.es
    assert (data["format"], data["genes"], data["popsize"], data["sigma0"]) == (1, optimizer.names, POPSIZE, 0.25)
    assert strategy["countiter"] == 3 and strategy["countevals"] == 3 * POPSIZE and strategy["count_eigen"] >= 2
    for key, shape in {"mean": (6,), "pc": (6,), "ps": (6,), "C": (6, 6), "B": (6, 6), "D": (6,)}.items():
        assert np.shape(strategy[key]) == shape, key
    np.testing.assert_array_equal(strategy["mean"], es.mean)  # asking does not move the distribution
    np.testing.assert_array_equal(strategy["ps"], es.adapt_sigma.ps)
    assert strategy["sigma"] == es.sigma and 0 < strategy["sigma"] < 0.25
    np.testing.assert_allclose(strategy["C"], np.array(strategy["C"]).T)  # a covariance: symmetric
    assert len(rng["key"]) == 624 and all(isinstance(k, int) for k in rng["key"]) and 0 <= rng["pos"] <= 624
    members = data["generation"]
    assert [m["kind"] for m in members] == ["sampled"] * POPSIZE
    assert [m["number"] for m in members[:3]] == [3 * POPSIZE, 3 * POPSIZE + 1, None]
    assert [m["done"] for m in members[:3]] == [True, True, False] and members[0]["value"] == pytest.approx(
        sphere(np.array(members[0]["x"]))
    )
    assert data["queue"] == [[0.75] * 6] and data["stale"] == []
    assert strategy["sigma_vec"] == [1.0] * 6 and data["directions"] == {"vectors": [], "mirrors": []}  # popsize 6


CORRUPTIONS = {
    "truncated": (
        lambda text, data: text[: len(text) // 2],
        None,
        "expected CMA-ES state as JSON, got a file that does not parse",
    ),
    "format": (lambda text, data: {**data, "format": 2}, "format", "expected CMA-ES state format 1, got 2"),
    "mean": (
        lambda text, data: {**data, "strategy": {**data["strategy"], "mean": data["strategy"]["mean"][:-1]}},
        "strategy.mean",
        "expected 6 finite numbers, got 5",
    ),
    "sigma": (
        lambda text, data: {**data, "strategy": {**data["strategy"], "sigma": math.nan}},
        "strategy.sigma",
        "expected a finite number, got nan",
    ),
    "covariance": (
        lambda text, data: {**data, "strategy": {**data["strategy"], "C": data["strategy"]["C"][:5]}},
        "strategy.C",
        "expected 6x6 finite numbers, got 5x6",
    ),
    "genes": (
        lambda text, data: {**data, "genes": [f"other.{name}" for name in data["genes"]]},
        "genes",
        "expected the 6 genes of this search's genome, got ['other.",
    ),
    "rng": (
        lambda text, data: {**data, "rng": {**data["rng"], "key": data["rng"]["key"][:100]}},
        "rng.key",
        "expected at least 624 item(s)",
    ),
    "candidate": (
        lambda text, data: {**data, "generation": [{**data["generation"][0], "z": [0.5] * 6}] + data["generation"][1:]},
        "generation[0]",
        "expected the candidate the stored strategy proposes, got another",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_cma_refuses_a_corrupt_state_file_and_leaves_it_as_it_is(tmp_path: Path, corruption: str):
    corrupt, field, expected = CORRUPTIONS[corruption]
    optimizer = open_optimizer(tmp_path, "cmaes")
    run(optimizer, POPSIZE + 2)
    path = optimizer.checkpoint
    text = path.read_text()
    bad = corrupt(text, json.loads(text))
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    written = path.read_bytes()

    with pytest.raises(InputError) as caught:
        open_optimizer(tmp_path, "cmaes", resume=True)
    message = str(caught.value)
    assert (caught.value.where, caught.value.field) == (str(path), field)
    assert message.startswith(f"{path}: {field + ': ' if field else ''}{expected}") and "\n" not in message
    assert path.read_bytes() == written  # refused, not overwritten


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


def genome_of(genes: int, name: str = "gp", objectives: int = 1) -> Genome:
    """make_genome's config over 2 + 2 * layers genes (`genes` even): the embeddings, the head, then mlp and the
    rest per layer."""
    layers = (genes - 2) // 2
    names = NAMES[:3] + [
        f"model.layers.{i}.{p}.weight" for i in range(layers) for p in ("mlp.up_proj", "input_layernorm")
    ]
    return Genome(make_genome(name, objectives=objectives).config, names, layers)


def test_gp_takes_one_objective_only():
    with pytest.raises(InputError) as caught:
        make_genome("gp", objectives=2)
    assert str(caught.value) == (
        "search.yml: optimizer.name: expected nsga2 or random for 2 objectives (a Pareto search), got 'gp'"
    )


@pytest.mark.parametrize("name", ALL)
def test_pareto_flag_says_which_optimizers_the_config_takes_several_objectives_for(name: str):
    try:
        make_genome(name, objectives=2)
    except InputError:
        assert not OPTIMIZERS[name].pareto
    else:
        assert OPTIMIZERS[name].pareto


def test_gp_is_refused_on_a_genome_above_its_bound():
    fits, too_large = genome_of(gp.MAX_GENES), genome_of(gp.MAX_GENES + 2)
    check_fits(fits.config, fits)
    with pytest.raises(InputError) as caught:
        check_fits(too_large.config, too_large)
    assert str(caught.value) == (
        f"search.yml: optimizer.name: expected a genome of at most {gp.MAX_GENES} genes for gp "
        f"(beyond that one ask takes over 2 s), got {gp.MAX_GENES + 2} genes"
    )
    large = genome_of(gp.MAX_GENES + 2, "cmaes")
    check_fits(large.config, large)  # the others take any size


def test_advice_names_the_optimizer_the_genome_size_and_what_else_fits():
    small, large, pareto = genome_of(6, "cmaes"), genome_of(gp.MAX_GENES + 2, "cmaes"), genome_of(6, "nsga2", 2)
    assert (
        advice(small.config, small) == "cmaes (6 genes): CMA-ES adapts a full covariance; at 6 genes gp would also fit"
    )
    assert advice(large.config, large) == (
        f"cmaes ({large.dim} genes): separable CMA-ES adapts a variance per gene (covariance auto: diagonal above "
        "40 genes)"
    )
    assert advice(pareto.config, pareto) == "nsga2 (6 genes): NSGA-II evolves a Pareto front of the objectives"
    assert advice(make_genome("gp").config, make_genome("gp")) == (
        f"gp (6 genes): a GP models the genes jointly, sample-efficient on few trials; fits up to {gp.MAX_GENES} genes"
    )


def open_separable(run_dir: Path, resume: bool = False) -> Optimizer:
    data = make_genome("cmaes", seed=5).config.model_dump(mode="json")
    data["optimizer"]["covariance"] = "diagonal"
    config = SearchConfig.from_dict(data, where="search.yml")
    return make_optimizer(config, Genome(config, NAMES, 2), RunDir(run_dir), resume=resume)


def test_separable_cma_improves_adapts_per_gene_and_resumes_exactly(tmp_path: Path):
    full = run(open_optimizer(tmp_path / "full", "cmaes", seed=5), 8 * POPSIZE)
    uninterrupted = open_separable(tmp_path / "a")
    expected = run(uninterrupted, 8 * POPSIZE)
    es = uninterrupted.state.es
    assert type(es.sm).__name__ == "GaussStandardConstant"  # no covariance matrix at all
    assert np.ptp(es.sigma_vec.scaling) > 0  # a variance per gene, adapted apart
    assert min(v for _, v in expected[-POPSIZE:]) < min(v for _, v in expected[:POPSIZE])
    assert not np.array_equal([x for x, _ in full], [x for x, _ in expected])  # another algorithm than full CMA
    optimizer, asked = open_separable(tmp_path / "b"), []
    for _ in range(8):
        asked += [x for x, _ in run(optimizer, POPSIZE - 1)]
        optimizer = open_separable(tmp_path / "b", resume=True)  # mid-generation
        asked += [x for x, _ in run(optimizer, 1)]
    np.testing.assert_array_equal(asked, [x for x, _ in expected])
    assert "C" not in json.loads(optimizer.checkpoint.read_text())["strategy"]


@pytest.mark.parametrize(("genes", "sampler"), [(40, "GaussFullSampler"), (42, "GaussStandardConstant")])
def test_covariance_auto_is_full_up_to_40_genes_and_diagonal_above(tmp_path: Path, genes: int, sampler: str):
    genome = genome_of(genes, "cmaes")
    optimizer = make_optimizer(genome.config, genome, RunDir(tmp_path), resume=False)
    assert genome.config.optimizer.covariance == "auto"
    assert type(optimizer.state.es.sm).__name__ == sampler
    assert json.loads(optimizer.checkpoint.read_text())["covariance"] == ("full" if genes == 40 else "diagonal")


def test_resuming_with_another_covariance_is_refused(tmp_path: Path):
    run(open_separable(tmp_path), POPSIZE + 1)
    with pytest.raises(
        InputError, match=r"covariance: expected full, this search's optimizer.covariance, got 'diagonal'"
    ):
        open_optimizer(tmp_path, "cmaes", seed=5, resume=True)


def test_covariance_is_refused_for_another_optimizer():
    data = make_genome("tpe").config.model_dump(mode="json")
    data["optimizer"]["covariance"] = "diagonal"
    with pytest.raises(InputError, match=r"search.yml: optimizer.covariance: expected it only with name: cmaes"):
        SearchConfig.from_dict(data, where="search.yml")
