"""Evaluator: real lm-eval on a live toy Llama whose weights are overwritten in place between calls."""

import json

import lm_eval
import pytest
import torch
import yaml
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalConfig, Evaluator, TaskSpec, hf_lm, parse
from merge_core.errors import InputError

LIMIT = 40


@pytest.fixture(scope="module")
def live(toy_family):
    """One live model (the base), its HFLM, and the state dicts of the base and the sort child."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(toy_family.base)
    model = AutoModelForCausalLM.from_pretrained(toy_family.base)
    config = EvalConfig(include_path=toy_family.tasks_dir, batch_size=32)
    states = {
        "base": {k: v.clone() for k, v in model.state_dict().items()},
        "srt": AutoModelForCausalLM.from_pretrained(toy_family.children["srt"]).state_dict(),
    }
    return model, tokenizer, hf_lm(model, tokenizer, config), config, states


@pytest.fixture(scope="module")
def search_evaluator(toy_family, live):
    _, _, _, config, _ = live
    specs = [TaskSpec(task=name, limit=LIMIT) for name in toy_family.search_tasks.values()]
    return Evaluator(config, specs)


def load_weights(model, state):
    with torch.no_grad():
        model.load_state_dict(state)


def items_of(toy_family, task):
    with open(toy_family.tasks_dir / f"{task}.jsonl") as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def teacher_forced_exact_match(model, tokenizer, prompt, answer):
    """By hand: greedy decoding yields answer + EOS iff the argmax is right at every one of those positions."""
    n_prompt = len(tokenizer(prompt).input_ids)
    ids = tokenizer(prompt + answer).input_ids + [tokenizer.eos_token_id]
    predicted = model(torch.tensor([ids])).logits[0].argmax(-1)
    return float(predicted[n_prompt - 1 : -1].tolist() == ids[n_prompt:])


def test_scores_equal_hand_computed_teacher_forcing(toy_family, live, search_evaluator):
    model, tokenizer, lm, _, states = live
    for weights in ("base", "srt"):
        load_weights(model, states[weights])
        scores = search_evaluator.evaluate(lm)
        for skill, task in toy_family.search_tasks.items():
            score, items = scores[task], items_of(toy_family, task)
            expected = [teacher_forced_exact_match(model, tokenizer, **items[i]) for i in score.item_ids]
            assert score.per_item == expected, (weights, skill)
            assert score.value == pytest.approx(sum(expected) / len(expected), abs=1e-12)
            assert score.metric == "acc,none" and score.higher_is_better is True
            assert score.n_items == len(score.item_ids) == len(score.per_item) == LIMIT
    # The check means something only if the scores are neither all right nor all wrong.
    assert 0 < sum(s.value for s in scores.values()) < len(scores)
    load_weights(model, states["base"])


def test_same_result_as_lm_eval_evaluate(toy_family, live, search_evaluator):
    """The per-call shortcut (requests built once) scores exactly what lm-eval's own evaluate() scores."""
    _, _, lm, _, _ = live
    ours = search_evaluator.evaluate(lm)
    manager = TaskManager(include_path=toy_family.tasks_dir, include_defaults=False)
    theirs = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(ours),
        task_manager=manager,
        samples={task: score.item_ids for task, score in ours.items()},
        bootstrap_iters=0,
    )
    for task, score in ours.items():
        assert score.value == theirs["results"][task]["acc,none"]
        by_doc = {sample["doc_id"]: float(sample["acc"]) for sample in theirs["samples"][task]}
        assert [by_doc[i] for i in score.item_ids] == score.per_item


def test_group_scores_as_lm_eval_aggregates_it(toy_family, live, search_evaluator):
    """toy_search is an lm-eval group (unweighted mean of its tasks): one score, items of every member."""
    _, _, lm, config, _ = live
    group = Evaluator(config, [TaskSpec(task="toy_search", limit=LIMIT)]).evaluate(lm)["toy_search"]
    members = search_evaluator.evaluate(lm)  # same limit and seed: the same items per member task
    assert group.value == pytest.approx(sum(s.value for s in members.values()) / len(members), abs=1e-12)
    assert group.per_item == [x for s in members.values() for x in s.per_item]
    assert group.item_ids == [f"{task}:{i}" for task, s in members.items() for i in s.item_ids]
    assert group.n_items == len(group.per_item) == LIMIT * len(members) and group.metric == "acc,none"
    theirs = lm_eval.simple_evaluate(
        model=lm,
        tasks=["toy_search"],
        task_manager=TaskManager(include_path=toy_family.tasks_dir, include_defaults=False),
        samples={task: s.item_ids for task, s in members.items()},
        bootstrap_iters=0,
    )
    assert group.value == pytest.approx(theirs["results"]["toy_search"]["acc,none"], abs=1e-12)


def test_fixed_subset_same_across_calls_and_changes_with_seed(toy_family, live, search_evaluator):
    _, _, lm, config, _ = live
    task = toy_family.search_tasks["rev"]
    first = search_evaluator.evaluate(lm)[task].item_ids
    assert search_evaluator.evaluate(lm)[task].item_ids == first
    assert first == sorted(set(first)) and len(first) == LIMIT and max(first) < 200

    def ids(seed, limit=LIMIT):
        evaluator = Evaluator(config.model_copy(update={"subset_seed": seed}), [TaskSpec(task=task, limit=limit)])
        return evaluator.evaluate(lm)[task].item_ids

    assert ids(config.subset_seed) == first
    assert ids(config.subset_seed + 1) != first
    assert ids(0, limit=None) == list(range(200))


def test_weights_overwritten_in_place_change_the_score_and_restoring_restores_it(toy_family, live, search_evaluator):
    model, _, lm, _, states = live
    task = toy_family.search_tasks["srt"]
    load_weights(model, states["base"])
    before = search_evaluator.evaluate(lm)
    load_weights(model, states["srt"])
    after = search_evaluator.evaluate(lm)
    assert after[task].value > before[task].value  # the sort child is better at sorting
    load_weights(model, states["base"])
    assert search_evaluator.evaluate(lm) == before  # no result caching, nothing left over from the child


def test_higher_is_better_follows_lm_eval_unless_overridden(toy_family, live, tmp_path):
    model, _, lm, config, _ = live
    task = toy_family.search_tasks["rev"]
    declared = yaml.safe_load((toy_family.tasks_dir / f"{task}.yaml").read_text())
    declared.update(
        task="rev_errors", metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": False}]
    )
    (tmp_path / "rev_errors.yaml").write_text(yaml.safe_dump(declared))
    local = config.model_copy(update={"include_path": tmp_path})
    assert Evaluator(local, [TaskSpec(task="rev_errors", limit=5)]).evaluate(lm)["rev_errors"].higher_is_better is False
    overridden = Evaluator(config, [TaskSpec(task=task, limit=5, higher_is_better=False)]).evaluate(lm)
    assert overridden[task].higher_is_better is False


def write_task(directory, name, **changes):
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(directory / "missing.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({**config, **changes}))


def expect_one_line_error(config, specs, *fragments):
    with pytest.raises(InputError) as caught:
        Evaluator(config, specs)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_hostile_task_specs_fail_with_one_line_before_any_scoring(toy_family, live, tmp_path, monkeypatch):
    config = live[3]
    rev = toy_family.search_tasks["rev"]
    expect_one_line_error(config, [TaskSpec(task="toy_rev_serach")], "tasks[0] (toy_rev_serach): task:", rev)
    expect_one_line_error(config, [TaskSpec(task=rev, metric="bleu")], f"({rev}): metric:", "acc", "'bleu'")
    expect_one_line_error(config, [TaskSpec(task=rev, metric="acc,strict")], "metric:", "none", "'strict'")
    expect_one_line_error(config, [TaskSpec(task=rev), TaskSpec(task=rev)], "tasks[1]", "twice")
    expect_one_line_error(config, [], "at least one task")
    expect_one_line_error(
        config.model_copy(update={"include_path": tmp_path / "nope"}), [TaskSpec(task=rev)], "include_path"
    )

    write_task(tmp_path, "no_data")
    local = config.model_copy(update={"include_path": tmp_path})
    expect_one_line_error(local, [TaskSpec(task="no_data")], "(no_data): data:", "missing.jsonl")

    # A group scores as one only through its own aggregate: without one there is no number to report.
    member = yaml.safe_load((toy_family.tasks_dir / f"{rev}.yaml").read_text()) | {"task": "member"}
    (tmp_path / "member.yaml").write_text(yaml.safe_dump(member))
    (tmp_path / "no_aggregate.yaml").write_text(yaml.safe_dump({"group": "no_aggregate", "task": ["member"]}))
    expect_one_line_error(local, [TaskSpec(task="no_aggregate")], "(no_aggregate): metric:", "acc,none")

    # A hub dataset that is not on disk fails at once even when the process is online (no network retries).
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    write_task(tmp_path, "hub_only", dataset_path="evomerge-test/not-downloaded", dataset_kwargs={})
    expect_one_line_error(local, [TaskSpec(task="hub_only")], "(hub_only): data:", "not-downloaded")


def test_config_errors_read_as_one_line():
    with pytest.raises(InputError, match=r"^search\.yaml: limit: expected an integer > 0, got 0$"):
        parse(TaskSpec, {"task": "x", "limit": 0}, "search.yaml")
    with pytest.raises(InputError, match=r"^eval\.yaml: batchsize: unknown key; expected one of: backend, "):
        parse(EvalConfig, {"batchsize": 8}, "eval.yaml")
    with pytest.raises(InputError, match=r"^eval\.yaml: vllm\.kv_cache_memory: expected bytes or a size like '80GB'"):
        parse(EvalConfig, {"backend": "vllm", "vllm": {"kv_cache_memory": "lots"}}, "eval.yaml")
    with pytest.raises(
        InputError, match=r"^search\.yaml: task: expected a value, got nothing \(this field is required\)$"
    ):
        parse(TaskSpec, {"metric": "acc"}, "search.yaml")
