"""The toy family: real checkpoints, skills the children really learned, clean splits, lm-eval parity."""

import json
import multiprocessing
import random
from concurrent.futures import Future

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators.toy_family import SIZES, SKILLS, build_family, exact_match
from evaluators.toy_family.build import FamilySize
from evaluators.toy_family.children import _relay
from evaluators.toy_family.skills import Skill
from evaluators.toy_family.splits import make_splits, training_stream
from evaluators.toy_family.tasks import read_items
from evaluators.toy_family.tokenizer import EOS_ID, build_tokenizer, encode
from evaluators.toy_family.training import Architecture, TrainRecipe, silent
from merge_core.errors import InputError

# A family small enough to build twice in a couple of seconds: for determinism, caching and placement.
TINY = FamilySize(
    Architecture(hidden=32, layers=1, heads=2, ffn=64),
    base=TrainRecipe(steps=40, lr=2e-3, weight_decay=0.01, warmup=5),
    child=TrainRecipe(steps=10, lr=1e-4, weight_decay=0.0, warmup=2),
    n_search=20,
    n_test=20,
)


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", TINY)
    return "tiny"


def test_tokenizer_round_trips_offline(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "srt:qejeydt=deejqty"
    ids = tokenizer(text).input_ids
    assert ids == encode(text) and len(ids) == len(text) + 1  # BOS + one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text + tokenizer.eos_token).input_ids[-1] == EOS_ID == tokenizer.eos_token_id


# Each skill's answer, written independently of the generators (and with the worked examples from the notes).
REFERENCE_ANSWERS = {
    "add": lambda x: str(int(x[:2]) + int(x[3:])),
    "rev": lambda x: "".join(reversed(x)),
    "srt": lambda x: "".join(sorted(x)),
    "cae": lambda x: "".join(chr((ord(c) - 94) % 26 + 97) for c in x),
    "ddp": lambda x: "".join(c for i, c in enumerate(x) if c not in x[:i]),
    "dig": lambda x: "".join(str(ord(c) - 97) for c in x),
    "swp": lambda x: "".join(b + a for a, b in zip(x[::2], x[1::2], strict=True)),
    "rot": lambda x: x[1:] + x[:1],
}


def test_every_skill_gives_exact_answers_in_vocabulary():
    assert set(SKILLS) == set(REFERENCE_ANSWERS)
    assert REFERENCE_ANSWERS["add"]("47+85") == "132" and REFERENCE_ANSWERS["cae"]("xyza") == "abcd"
    vocab = build_tokenizer().get_vocab()
    rng = random.Random(0)
    for name, skill in SKILLS.items():
        for _ in range(50):
            prompt, answer = skill.sample(rng)
            assert prompt.startswith(f"{name}:") and prompt.endswith("="), prompt
            assert answer == REFERENCE_ANSWERS[name](prompt[4:-1]), prompt
            assert all(ch in vocab for ch in prompt + answer)


def test_checkpoints_load_and_greedy_generation_matches_the_scorer(toy_family):
    tokenizer = AutoTokenizer.from_pretrained(toy_family.base)
    for skill, path in toy_family.children.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        items = read_items(toy_family.tasks_dir, skill, "search")[:24]
        generated = []
        for prompt, _ in items:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            generated.append(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist())
        # The right format: an answer of plain characters, then EOS (where generation stops).
        assert sum(out[-1] == EOS_ID for out in generated) >= 20, skill
        assert not any(set(tokenizer.decode(out, skip_special_tokens=True)) & set(":=") for out in generated)
        # Teacher-forced exact match is greedy decoding, item by item.
        greedy_hits = [out == encode(answer)[1:] + [EOS_ID] for out, (_, answer) in zip(generated, items, strict=True)]
        assert greedy_hits == exact_match(model, items) and any(greedy_hits), skill


def test_each_child_beats_the_base_on_its_own_skill(toy_family):
    scores = toy_family.manifest["scores"]
    for skill in toy_family.children:
        assert scores[skill]["search"][skill] >= scores["base"]["search"][skill] + 0.05, (skill, scores)
    # The manifest's numbers are the checkpoints' numbers.
    skill, path = next(iter(toy_family.children.items()))
    model = AutoModelForCausalLM.from_pretrained(path)
    hits = exact_match(model, read_items(toy_family.tasks_dir, skill, "test"))
    assert sum(hits) / len(hits) == scores[skill]["test"][skill]


def test_splits_are_fixed_disjoint_and_held_out(toy_family):
    manifest = toy_family.manifest
    size = SIZES[manifest["size"]]
    for skill in toy_family.children:
        search = read_items(toy_family.tasks_dir, skill, "search")
        test = read_items(toy_family.tasks_dir, skill, "test")
        assert (len(search), len(test)) == (size.n_search, size.n_test)
        assert not {p for p, _ in search} & {p for p, _ in test}
        expected = make_splits(SKILLS[skill], n_search=size.n_search, n_test=size.n_test, split_seed=1234)
        assert expected == {"search": search, "test": test}
    # The stream skips held-out prompts: with only 8 possible prompts, 4 held out, the other 4 all appear.
    tiny = Skill("tny", 1.0, lambda rng: (str(rng.randint(0, 7)), "x"))
    held_out = frozenset(f"tny:{i}=" for i in range(4))
    stream = training_stream([(tiny, 1.0)], held_out, random.Random(0))
    seen = {next(stream)[0] for _ in range(500)}
    assert seen == {f"tny:{i}=" for i in range(4, 8)}


def test_same_seed_same_family_and_the_cache_is_reused(tmp_path, tiny_size):
    first = build_family(size=tiny_size, skills=["rev", "srt"], cache_dir=tmp_path / "a")
    second = build_family(size=tiny_size, skills="srt,rev", cache_dir=tmp_path / "b")
    other_seed = build_family(size=tiny_size, skills=["rev", "srt"], seed=1, cache_dir=tmp_path / "a")
    weights = [(f.children["srt"] / "model.safetensors").read_bytes() for f in (first, second, other_seed)]
    assert weights[0] == weights[1] != weights[2]
    assert first.manifest["scores"] == second.manifest["scores"]
    assert first.manifest["key"] == second.manifest["key"] != other_seed.manifest["key"]

    weights_file = first.children["srt"] / "model.safetensors"
    written = weights_file.stat()
    again = build_family(size=tiny_size, skills=["rev", "srt"], cache_dir=tmp_path / "a")
    reread = weights_file.stat()
    assert (reread.st_ino, reread.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # reused, not rebuilt
    assert again.root == first.root and again.manifest == first.manifest
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([first.root.name, other_seed.root.name])
    assert "srt/search" in str(first) and str(first.root) in str(first)


def test_children_trained_in_worker_processes_are_byte_identical_to_serial_ones(tmp_path, tiny_size):
    skills = ["rev", "srt"]
    serial = build_family(size=tiny_size, skills=skills, cache_dir=tmp_path / "serial", workers=1)
    calls = []
    parallel = build_family(
        size=tiny_size,
        skills=skills,
        cache_dir=tmp_path / "parallel",
        workers=2,
        on_progress=lambda *c: calls.append(c),
    )
    assert (serial.manifest["workers"], parallel.manifest["workers"]) == (1, 2)
    assert parallel.manifest["key"] == serial.manifest["key"]  # how it was built is not a parameter of the family
    weights = [
        {m: (f.root / m / "model.safetensors").read_bytes() for m in ["base", *skills]} for f in (serial, parallel)
    ]
    assert weights[0] == weights[1]
    assert parallel.manifest["scores"] == serial.manifest["scores"]
    assert parallel.manifest["final_loss"] == serial.manifest["final_loss"]
    # Every worker step reaches on_progress in this process, in order, the children listed in skill order.
    stages = ["training base", "training rev", "training srt", "scoring"]
    assert list(dict.fromkeys(stage for stage, _, _ in calls)) == stages
    every_step = [(done, TINY.child.steps) for done in range(1, TINY.child.steps + 1)]
    for stage in ("training rev", "training srt"):
        assert [(done, total) for s, done, total in calls if s == stage] == every_step


def test_a_failed_worker_raises_instead_of_leaving_the_build_waiting():
    failed = Future()
    failed.set_exception(KeyError("nope"))
    steps = multiprocessing.get_context("spawn").Queue()  # no step will ever come
    with pytest.raises(KeyError, match="nope"):
        _relay(steps, {"rev": failed}, TINY.child.steps, silent)


def test_out_dir_gets_a_self_contained_copy(tmp_path, tiny_size):
    family = build_family(tmp_path / "fam", size=tiny_size, skills=["rev", "srt"], cache_dir=tmp_path / "cache")
    assert family.root == (tmp_path / "fam").resolve() and family.children["rev"] == family.root / "rev"
    task = (family.tasks_dir / f"{family.test_tasks['rev']}.yaml").read_text()
    assert str(family.tasks_dir / "toy_rev_test.jsonl") in task  # data named where the family now is
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written build left behind
    assert build_family(tmp_path / "fam", size=tiny_size, skills=["rev", "srt"], cache_dir=tmp_path / "cache").root == (
        family.root
    )
    with pytest.raises(InputError, match="expected an empty directory or a toy family built with these parameters"):
        build_family(tmp_path / "fam", size=tiny_size, skills=["rev", "cae"], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": "huge"}, "^toy family: size: expected one of test, demo, deep, got 'huge'$"),
        ({"skills": ["srt", "nope"]}, "^toy family: skills: expected some of .*, got 'nope'$"),
        ({"skills": ["srt"]}, "^toy family: skills: expected 2 to 4 distinct names, got srt$"),
        ({"skills": ["srt", "srt"]}, "^toy family: skills: expected 2 to 4 distinct names, got srt,srt$"),
    ],
)
def test_bad_parameters_give_one_clear_line(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message) as error:
        build_family(cache_dir=tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_lm_eval_acc_equals_our_scorer(toy_family):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    skill = next(iter(toy_family.children))
    model = AutoModelForCausalLM.from_pretrained(toy_family.children[skill]).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_family.children[skill])
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64),
        tasks=["toy_search"],
        task_manager=TaskManager(include_path=str(toy_family.tasks_dir), include_defaults=False),
        log_samples=True,
        verbosity="ERROR",
    )
    for name, task in toy_family.search_tasks.items():
        ours = exact_match(model, read_items(toy_family.tasks_dir, name, "search"))
        theirs = [bool(s["acc"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
        assert theirs == ours, name
        assert results["results"][task]["acc,none"] == sum(ours) / len(ours)
    assert 0 < results["results"]["toy_search"]["acc,none"] < 1  # neither trivial nor impossible
    per_skill = [results["results"][t]["acc,none"] for t in toy_family.search_tasks.values()]
    assert results["results"]["toy_search"]["acc,none"] == pytest.approx(sum(per_skill) / len(per_skill))
    assert (
        json.loads((toy_family.root / "manifest.json").read_text())["scores"][skill]["search"][skill]
        == (results["results"][toy_family.search_tasks[skill]]["acc,none"])
    )
