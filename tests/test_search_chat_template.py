"""A search over a recipe with a chat template: every candidate, the export and the evaluation carry it."""

import pytest
from test_genome import llama_names

from evaluators import EvalConfig, TaskSpec
from merge_core.chat_template import CHATML
from merge_core.errors import InputError
from search.config import SearchConfig
from search.execution.worker import CandidateWorker, WorkerSpec
from search.genome.data_flow import PathGenome
from search.genome.parameter_space import Genome


def config(**merge) -> SearchConfig:
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/sort", "org/reverse"]},
        "merge": {"method": "ties", "chat_template": "chatml"} | merge,
        "objectives": [{"task": "sort", "metric": "exact_match"}],
    }
    if merge.get("method") == "passthrough":
        data["genome"] = {"kind": "dfs"}
    return SearchConfig.from_dict(data, where="search.yml")


def test_every_decoded_candidate_keeps_the_template():
    weights = Genome(config(), llama_names(2), 2)
    assert weights.decode(weights.default_candidates()[0]).chat_template == "chatml"
    paths = PathGenome(config(method="passthrough"), 2)
    recipe = paths.decode(paths.default_candidates()[0])
    assert recipe.chat_template == "chatml" and "chat_template: chatml" in recipe.to_yaml()


@pytest.mark.parametrize(
    ("merge", "evaluation", "message"),
    [
        ({"chat_template": "alpaca"}, {}, "merge.chat_template: 'alpaca' is a template mergekit ships"),
        (
            {},
            {"backend": "vllm", "apply_chat_template": True},
            "merge.chat_template: expected none with evaluation.backend vllm and apply_chat_template",
        ),
    ],
    ids=["mergekit-only-name", "vllm-scoring-through-it"],
)
def test_a_template_the_search_cannot_use_is_one_line(merge, evaluation, message):
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/sort", "org/reverse"]},
        "merge": {"method": "ties", "chat_template": "chatml"} | merge,
        "objectives": [{"task": "sort", "metric": "exact_match"}],
        "evaluation": evaluation,
    }
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict(data, where="search.yml")
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"search.yml: {message}"), str(caught.value)


def test_the_worker_scores_through_the_template(toy_family):
    models = (str(toy_family.base), *map(str, toy_family.children.values()))
    spec = WorkerSpec(
        models=models,
        device="cpu",
        eval_config=EvalConfig(include_path=toy_family.tasks_dir, apply_chat_template=True),
        search_parts=((TaskSpec(task="toy_search"),),),
        heldout_tasks=(),
        chat_template="chatml",
    )
    worker = CandidateWorker(spec)
    assert worker.tokenizer.chat_template == CHATML
    assert worker.lm.tokenizer.chat_template == CHATML
