"""A search over models whose vocabularies differ: merge.tokenizer_source / merge.tokenizer are carried into every
candidate and the export, the live model takes the merged vocabulary's size and candidates are scored with the
merged tokenizer, and `evomerge merge` of the export rebuilds the best trial."""

import pytest
import torch
import yaml
from conftest import CHATML_TOKENS, make_vocab_family, with_tokens
from test_genome import llama_names
from test_search_e2e import write_config
from test_session import load_dir
from transformers import AutoTokenizer

from evaluators import EvalConfig, TaskSpec
from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from search.cli import main
from search.config import SearchConfig
from search.execution.preflight import preflight
from search.execution.worker import CandidateWorker, WorkerSpec
from search.genome.parameter_space import Genome
from search.results.baselines import default_baselines, parent, with_tokenizer
from search.runner import run_search

ADDED = [*CHATML_TOKENS, "<tool>"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return make_vocab_family(tmp_path_factory.mktemp("vocab"))


def search_config(family: dict, merge: dict, **sections) -> SearchConfig:
    data = {
        "models": {"base": family["base"], "fine_tunes": [family["chat"], family["tool"]]},
        "merge": {"method": "task_arithmetic"} | merge,
        "objectives": [{"task": "sort", "metric": "exact_match"}],
    } | sections
    return SearchConfig.from_dict(data, where="search.yml")


def test_every_recipe_the_search_builds_carries_the_setting(family):
    block = {"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}}}, "pad_to_multiple_of": 16}
    config = search_config(family, {"tokenizer": block})
    genome = Genome(config, llama_names(2), 2)
    decoded = genome.decode(genome.default_candidates()[0])
    assert decoded.tokenizer.model_dump(mode="json", exclude_none=True) == block | {
        "tokens": {"<x>": {"source": {"kind": "zero"}, "force": False}}
    }
    base = search_config(family, {"tokenizer_source": "base"})
    references = with_tokenizer(default_baselines(family["base"], [family["chat"], family["tool"]]), base.merge, "B")
    # the linear average has no base_model: `base` names the base's tokenizer directly
    assert {name: recipe.tokenizer_source for name, recipe in references.items()} == {
        "linear average": "B",
        "ties d=0.5 w=1": "base",
        "task arithmetic λ=1": "base",
    }


def worker(family: dict, tasks) -> CandidateWorker:
    spec = WorkerSpec(
        models=(family["base"], family["chat"], family["tool"]),
        device="cpu",
        eval_config=EvalConfig(include_path=tasks.tasks_dir),
        search_parts=((TaskSpec(task="toy_search"),),),
        heldout_tasks=(),
    )
    return CandidateWorker(spec)


def test_the_live_model_and_its_tokenizer_are_the_merge(family, toy_family, tmp_path):
    config = search_config(family, {"tokenizer_source": "union", "dtype": "float32"})
    genome = Genome(config, llama_names(2), 2)
    recipe = genome.decode(genome.default_candidates()[0])
    (tmp_path / "r.yml").write_text(recipe.to_yaml())
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 0
    written = load_dir(tmp_path / "out")
    live = worker(family, toy_family)
    lm = live._merge(recipe, 0)
    state = live.model.state_dict()
    assert state["model.embed_tokens.weight"].shape[0] == 44 + 3
    assert [name for name, tensor in written.items() if not torch.equal(state[name], tensor)] == []
    merged = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert lm.tokenizer.get_vocab() == merged.get_vocab()
    assert lm.tokenizer.convert_tokens_to_ids(ADDED) == merged.convert_tokens_to_ids(ADDED) == [44, 45, 46]
    # a parent keeps its own vocabulary and tokenizer; the union candidate is still that after it
    own = live._merge(parent(family["chat"]), 0)
    assert torch.equal(live.model.state_dict()["lm_head.weight"], load_dir(family["chat"])["lm_head.weight"])
    assert own.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(family["chat"]).get_vocab()
    assert live._merge(recipe, 0) is lm and torch.equal(
        live.model.state_dict()["lm_head.weight"], written["lm_head.weight"]
    )


def test_differing_vocabularies_without_a_setting_are_one_line(family):
    with pytest.raises(InputError) as caught:
        preflight(search_config(family, {}))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("search.yml: merge.tokenizer_source: expected one for models")
    assert f"{family['chat']} has vocab_size 46, {family['base']} has 44" in message


@pytest.mark.parametrize(
    ("merge", "sections", "message"),
    [
        (
            {"tokenizer_source": "union"},
            {"evaluation": {"backend": "vllm"}},
            "merge.tokenizer_source: expected none with evaluation.backend vllm",
        ),
        (
            {"tokenizer": {"source": "union"}, "method": "passthrough"},
            {"genome": {"kind": "dfs"}},
            "merge.tokenizer.source: expected none with genome.kind dfs",
        ),
        ({"tokenizer_source": "org/other"}, {}, "merge.tokenizer_source: expected base, union or one of this search's"),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": "org/other"}}}},
            {},
            "merge.tokenizer.tokens.<x>.source: 'org/other' is not a model of this recipe",
        ),
        ({"tokenizer_source": "base", "method": "linear"}, {}, "merge.tokenizer_source: 'base' needs a base_model"),
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, {}, "merge.tokenizer: expected tokenizer:"),
    ],
    ids=["vllm", "dfs", "unknown-model", "unknown-token-model", "base-without-base", "both"],
)
def test_a_setting_the_search_cannot_use_is_one_line(family, merge, sections, message):
    with pytest.raises(InputError) as caught:
        search_config(family, merge, **sections)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"search.yml: {message}"), str(caught.value)


def test_a_union_search_exports_the_best_trial(toy_family, tmp_path):
    srt = with_tokens(str(toy_family.children["srt"]), tmp_path / "srt-chat", CHATML_TOKENS, seed=1)
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        models={"fine_tunes": [srt, str(toy_family.children["rev"])]},
        merge={"tokenizer_source": "union"},
        held_out={"tasks": [{"task": toy_family.test_tasks["srt"], "metric": "acc"}], "limit": 10},
        fitness={"limit": 10},
        optimizer={"name": "random", "popsize": 2},
        budget={"trials": 2},
    )
    summary = run_search(config)
    # parents (srt-chat's own 54 rows, the base's 52) and the union baselines were all scored
    assert {p.name for p in summary.parents} == {"base", "srt-chat", "rev"} and summary.baselines
    assert all(0.0 <= entry.heldout["average"] <= 1.0 for entry in [*summary.parents, *summary.baselines])
    assert all(Recipe.from_yaml(entry.recipe).tokenizer_source == "union" for entry in summary.baselines)
    run_dir = tmp_path / "run"
    trials = sorted((run_dir / "recipes").glob("trial-*.yml"))
    assert len(trials) == 2 and all(Recipe.from_yaml(t).tokenizer_source == "union" for t in trials)
    assert main(["export", str(run_dir), "--evolved", "--out", str(tmp_path / "best.yml")]) == 0
    assert yaml.safe_load((tmp_path / "best.yml").read_text())["tokenizer_source"] == "union"
    assert main(["merge", str(tmp_path / "best.yml"), str(tmp_path / "merged"), "--seed", "3"]) == 0
    best = Recipe.from_yaml(run_dir / summary.best.recipe)
    ours = MergeSession(best.model_refs()).materialize(best, seed=3)
    theirs = load_dir(tmp_path / "merged")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[name], ours[name]) for name in ours)
    assert ours["model.embed_tokens.weight"].shape[0] == 52 + 2
