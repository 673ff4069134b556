"""Tokenizer merging (`tokenizer_source: base | union | MODEL` and the `tokenizer:` block) over models whose
vocabularies differ: checked against mergekit 0.1.5's own output with tolerance 0 (every tensor, config.json,
the tokenizer files byte for byte), the row rules checked on their values, and bad input as one line.

The family: a tiny Llama base and two fine-tunes that grew their vocabulary the usual way (tokens added to the
tokenizer, embed_tokens and lm_head resized by transformers, config vocab_size raised): `chat` adds the ChatML
tokens, `tool` adds them too and one plain token more.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import CHARS, make_tiny_family, make_vocab_family, with_tokens
from test_session import load_dir, mergekit_merge
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from merge_core import MergeSession, Recipe
from merge_core.chat_template import CHATML
from merge_core.errors import InputError

# Written besides the tokenizer. mergekit drops generation_config.json (evomerge keeps it) and writes the recipe
# as it was given (evomerge writes its own minimal YAML).
NOT_TOKENIZER = {"config.json", "model.safetensors", "mergekit_config.yml", "generation_config.json"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return make_vocab_family(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def session(family):
    return MergeSession(list(family.values()))


def task_arithmetic(f: dict, extra: str) -> str:
    return f"""
merge_method: task_arithmetic
base_model: {f["base"]}
models:
  - {{model: {f["chat"]}, parameters: {{weight: 0.6}}}}
  - {{model: {f["tool"]}, parameters: {{weight: 0.5}}}}
dtype: float32
{extra}"""


def block(f: dict, source: str = "union") -> str:
    """The tokenizer: block with every kind of token source, force, and padding (48 tokens -> 64 rows)."""
    return f"""tokenizer:
  source: {source}
  tokens:
    "<|im_start|>": {{source: {{kind: zero}}}}
    "<|im_end|>": {{source: {f["chat"]}, force: true}}
    "<tool>": {{source: {{kind: model_token, model: {f["base"]}, token: a}}, force: true}}
    "<think>": {{source: {{kind: model_token, model: {f["tool"]}, token_id: 5}}}}
  pad_to_multiple_of: 32
"""


def recipes(f: dict) -> dict[str, tuple[str, int]]:
    """name -> (recipe, the output vocab_size mergekit writes)."""
    return {
        "base": (task_arithmetic(f, "tokenizer_source: base"), CHARS),
        "union": (task_arithmetic(f, "tokenizer_source: union"), CHARS + 3),
        "model": (task_arithmetic(f, f"tokenizer_source: {f['chat']}"), CHARS + 2),
        "block": (task_arithmetic(f, block(f)), 64),
        # the mean (union) and the padding (block) computed in bfloat16, rounding at each step as mergekit's do
        "union_bfloat16": (task_arithmetic(f, "tokenizer_source: union").replace("float32", "bfloat16"), CHARS + 3),
        "block_bfloat16": (task_arithmetic(f, block(f)).replace("float32", "bfloat16"), 64),
        # embeddings from the first slice's models (base, chat), lm_head from the last's (tool, chat): each
        # tensor's rows follow the rules over its own inputs
        "slices": (
            f"""
merge_method: linear
base_model: {f["base"]}
slices:
  - sources: [{{model: {f["base"]}, layer_range: [0, 1]}}, {{model: {f["chat"]}, layer_range: [0, 1]}}]
  - sources: [{{model: {f["tool"]}, layer_range: [1, 2]}}, {{model: {f["chat"]}, layer_range: [1, 2]}}]
parameters: {{weight: 0.5}}
dtype: float32
tokenizer_source: union
""",
            CHARS + 3,
        ),
        # no base_model: a token two of three models have is their mean; with a chat template to write
        "linear_chat_template": (
            f"""
merge_method: linear
models:
  - {{model: {f["base"]}, parameters: {{weight: 0.3}}}}
  - {{model: {f["chat"]}, parameters: {{weight: 0.3}}}}
  - {{model: {f["tool"]}, parameters: {{weight: 0.4}}}}
dtype: float32
tokenizer_source: {f["tool"]}
chat_template: chatml
""",
            CHARS + 3,
        ),
    }


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.name not in NOT_TOKENIZER}


@pytest.mark.parametrize("name", list(recipes({"base": "", "chat": "", "tool": ""})))
def test_writes_what_mergekit_writes(name, family, session, tmp_path):
    text, vocab_size = recipes(family)[name]
    out = session.write(Recipe.from_yaml(text), tmp_path / "ours")
    theirs = mergekit_merge(text, tmp_path / "mk")
    ours = load_dir(out)
    assert sorted(ours) == sorted(theirs)
    assert [name for name, tensor in theirs.items() if not torch.equal(ours[name], tensor)] == []
    assert ours["model.embed_tokens.weight"].shape[0] == ours["lm_head.weight"].shape[0] == vocab_size
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((tmp_path / "mk" / "config.json").read_text())
    assert config["vocab_size"] == vocab_size
    # Both save the output tokenizer through transformers' save_pretrained, so the files agree byte for byte.
    files = tokenizer_files(out)
    assert files == tokenizer_files(tmp_path / "mk") and "tokenizer.json" in files
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    assert len(vocab) == (48 if name.startswith("block") else vocab_size)
    assert (out / "generation_config.json").exists()
    if name == "linear_chat_template":
        assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def test_in_memory_merge_is_the_written_one(family, session, tmp_path):
    recipe = Recipe.from_yaml(recipes(family)["block"][0])
    merged = session.materialize(recipe)
    written = load_dir(session.write(recipe, tmp_path / "ours"))
    assert sorted(merged) == sorted(written)
    assert all(torch.equal(merged[name], tensor) for name, tensor in written.items())
    config = LlamaConfig.from_pretrained(family["base"], vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    session.apply(recipe, model)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in merged.items())
    # The sources stay as they were loaded: the aligned rows are kept apart from them.
    assert session.checkpoints[family["tool"]].tensors["model.embed_tokens.weight"].shape[0] == CHARS + 3
    # `evomerge merge` (out of core: nothing resident, nothing kept) aligns the same rows.
    streamed = MergeSession(recipe.model_refs(), out_of_core=True).materialize(recipe)
    assert all(torch.equal(streamed[name], tensor) for name, tensor in written.items())


def test_vocabulary_is_built_once_per_setting(family):
    session = MergeSession(list(family.values()))
    union = Recipe.from_yaml(task_arithmetic(family, "tokenizer_source: union"))
    session.materialize(union)
    vocabulary = next(iter(session._vocabularies.values()))
    # another recipe with the same tokenizer setting (other weights) reuses it, and the aligned rows
    session.materialize(Recipe.from_yaml(task_arithmetic(family, "tokenizer_source: union").replace("0.6", "0.1")))
    assert list(session._vocabularies.values()) == [vocabulary] and len(session._aligned) == 2
    session.materialize(Recipe.from_yaml(task_arithmetic(family, "tokenizer_source: base")))
    assert len(session._vocabularies) == 2


def rows_of(merged: dict, tokenizer_dir: Path, token: str) -> torch.Tensor:
    return merged["model.embed_tokens.weight"][AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()[token]]


def test_rows_follow_the_rules(family, session, tmp_path):
    """Weights 1, 0, 0 make the merge the base's aligned rows exactly: each rule is seen in its values."""
    text = f"""
merge_method: linear
models:
  - {{model: {family["base"]}, parameters: {{weight: 1.0}}}}
  - {{model: {family["chat"]}, parameters: {{weight: 0.0}}}}
  - {{model: {family["tool"]}, parameters: {{weight: 0.0}}}}
{block(family)}"""
    out = session.write(Recipe.from_yaml(text), tmp_path / "ours")
    merged = load_dir(out)
    embed = {name: load_dir(Path(path))["model.embed_tokens.weight"] for name, path in family.items()}
    ids = {name: AutoTokenizer.from_pretrained(path).get_vocab() for name, path in family.items()}
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    rows = merged["model.embed_tokens.weight"]
    assert torch.equal(rows[: vocab["z"] + 1], embed["base"][: vocab["z"] + 1])  # its own tokens: its own rows
    assert torch.equal(rows[vocab["<|im_start|>"]], torch.zeros(32))  # {kind: zero}
    assert torch.equal(rows[vocab["<|im_end|>"]], embed["chat"][ids["chat"]["<|im_end|>"]])  # a model's row
    assert torch.equal(rows[vocab["<tool>"]], embed["base"][ids["base"]["a"]])  # model_token, forced
    assert torch.equal(rows[vocab["<think>"]], embed["tool"][5])  # model_token by id, for a token no model has
    assert torch.equal(rows[48:], rows[:48].mean(0).expand(16, 32))  # padding: the mean of the real rows

    # A token two of three models have and there is no base: their mean.
    union = "merge_method: linear\nmodels:\n" + "".join(
        f"  - {{model: {family[name]}, parameters: {{weight: {weight}}}}}\n"
        for name, weight in (("base", 1.0), ("chat", 0.0), ("tool", 0.0))
    )
    merged = session.materialize(Recipe.from_yaml(union + "tokenizer_source: union\n"))
    rows = merged["model.embed_tokens.weight"]
    start = (embed["chat"][CHARS] + embed["tool"][CHARS]) / 2
    assert torch.equal(rows[CHARS], start) and not torch.equal(start, embed["chat"][CHARS])
    assert torch.equal(rows[CHARS + 2], embed["tool"][CHARS + 2])  # <tool>: the one model that has it


def test_a_base_that_has_the_token_gives_its_row(family, tmp_path):
    """chat as base_model: the ChatML tokens tool also has come from chat, not from their mean."""
    f = family
    text = f"""
merge_method: task_arithmetic
base_model: {f["chat"]}
models:
  - {{model: {f["base"]}, parameters: {{weight: 0.0}}}}
  - {{model: {f["tool"]}, parameters: {{weight: 0.0}}}}
dtype: float32
tokenizer_source: {f["tool"]}
"""
    session = MergeSession([f["chat"], f["base"], f["tool"]])
    out = session.write(Recipe.from_yaml(text), tmp_path / "ours")
    theirs = mergekit_merge(text, tmp_path / "mk")
    ours = load_dir(out)
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
    chat = load_dir(Path(f["chat"]))["model.embed_tokens.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"][CHARS], chat[CHARS])


BAD = {
    "both_settings": (
        "tokenizer_source: union\ntokenizer: {source: union}\n",
        "<text>: tokenizer: expected tokenizer: or tokenizer_source:, not both (mergekit refuses both)",
    ),
    "token_source_not_in_recipe": (
        'tokenizer: {tokens: {"<x>": {source: elsewhere}}}\n',
        "<text>: tokenizer.tokens.<x>.source: 'elsewhere' is not a model of this recipe; expected one of {chat}, "
        "{tool}, {base}",
    ),
    "model_token_both": (
        'tokenizer: {tokens: {"<x>": {source: {kind: model_token, model: {base}, token: a, token_id: 1}}}}\n',
        "<text>: tokenizer.tokens.<x>.source: expected exactly one of token and token_id",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_tokenizer_settings_are_one_line(name, family):
    extra, expected = BAD[name]
    with pytest.raises(InputError) as error:
        Recipe.from_yaml(task_arithmetic(family, extra.replace("{base}", family["base"])))
    assert str(error.value) == expected.format(**family)


MERGE_TIME = {
    "model_token_the_model_lacks": (
        'tokenizer: {tokens: {"<x>": {source: {kind: model_token, model: {base}, token: "<|im_end|>"}}}}\n',
        "<text>: tokenizer.tokens.<x>.source.token: {base}'s tokenizer has no token '<|im_end|>'",
    ),
    "model_source_lacks_the_token": (
        'tokenizer: {tokens: {"<tool>": {source: {chat}}}}\n',
        "<text>: tokenizer.tokens.<tool>.source: {chat} has no token '<tool>': name a model that has it",
    ),
    "token_id_past_the_rows": (
        'tokenizer: {tokens: {"<x>": {source: {kind: model_token, model: {base}, token_id: 44}}}}\n',
        "<text>: tokenizer.tokens.<x>.source.token_id: 44 is past {base}'s 44 rows of model.embed_tokens.weight",
    ),
    "differing_vocabularies_without_a_setting": (
        "",
        "{tool}: vocab_size 47 differs from {chat}'s 46 (set tokenizer_source: base, union or a model to merge "
        "differing vocabularies)",
    ),
}


@pytest.mark.parametrize("name", list(MERGE_TIME))
def test_bad_tokens_found_when_merging_are_one_line(name, family, session):
    extra, expected = MERGE_TIME[name]
    for key in ("base", "chat"):
        extra = extra.replace("{" + key + "}", family[key])
    recipe = Recipe.from_yaml(task_arithmetic(family, extra))
    with pytest.raises(InputError) as error:
        session.materialize(recipe)
    assert str(error.value) == expected.format(**family)


def test_a_new_token_in_base_mode_counts_as_missing_from_the_base(family, session):
    """mergekit 0.1.5 fails here (KeyError: its base tokenizer is the output one, so the new token looks like
    the base's at an id past its rows); evomerge takes it as a token no model has."""
    extra = 'tokenizer:\n  source: base\n  tokens:\n    "<new>": {source: {kind: zero}}\n'
    merged = session.materialize(Recipe.from_yaml(task_arithmetic(family, extra)))
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape == (CHARS + 1, 32)
    assert torch.equal(embed[CHARS], torch.zeros(32)) and embed[:CHARS].abs().sum() > 0


def save_bpe_tokenizer(directory: Path, past: list[str]) -> int:
    """A small BPE tokenizer with `past` added at its end; returns its size without them (the model's rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {token: index for index, token in enumerate(["<s>", "</s>", "<unk>", *chars, "ab", "abc", "de"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c"), ("d", "e")], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    size = len(tokenizer)
    tokenizer.add_tokens(past, special_tokens=True)
    tokenizer.save_pretrained(directory)
    return size


@pytest.fixture(scope="module")
def bpe_family(tmp_path_factory) -> dict[str, str]:
    """A base whose BPE tokenizer has two tokens past its vocab_size (reserved, without rows), and a fine-tune
    that gave one of them a row and added one more."""
    root = tmp_path_factory.mktemp("bpe")
    size = save_bpe_tokenizer(root / "probe", ["<r0>", "<r1>"])
    f = make_tiny_family(root, tie_embeddings=False, children=1, layers=2, vocab=size)
    save_bpe_tokenizer(Path(f["base"]), ["<r0>", "<r1>"])
    save_bpe_tokenizer(Path(f["child0"]), ["<r0>"])
    f["grown"] = with_tokens(f["child0"], root / "grown", ["<extra>"], seed=3)
    return {"base": f["base"], "grown": f["grown"], "size": size}


@pytest.mark.parametrize("source", ["base", "union"])
def test_a_base_tokenizer_is_cut_to_its_rows_as_mergekit_cuts_it(source, bpe_family, tmp_path):
    f = bpe_family
    text = f"""
merge_method: task_arithmetic
base_model: {f["base"]}
models: [{{model: {f["grown"]}, parameters: {{weight: 0.7}}}}]
dtype: float32
tokenizer_source: {source}
"""
    recipe = Recipe.from_yaml(text)
    out = MergeSession(recipe.model_refs()).write(recipe, tmp_path / "ours")
    theirs = mergekit_merge(text, tmp_path / "mk")
    ours = load_dir(out)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[name], t) for name, t in theirs.items())
    assert tokenizer_files(out) == tokenizer_files(tmp_path / "mk")
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    # base: the reserved tokens are gone; union: the fine-tune's <r0> and <extra>, which have rows there, come back
    expected = {"base": set(), "union": {"<r0>", "<extra>"}}[source]
    assert {token for token in vocab if token.startswith("<") and token not in ("<s>", "</s>", "<unk>")} == expected
    assert json.loads((out / "config.json").read_text())["vocab_size"] == f["size"] + len(expected) == len(vocab)


def test_a_tokenizer_past_its_rows_that_cannot_be_cut_is_one_line(tmp_path):
    """The char tokenizer (WordLevel) with 44 tokens over 40 rows: mergekit cuts only BPE tokenizers."""
    f = make_tiny_family(tmp_path, tie_embeddings=False, children=1, layers=2, vocab=40)
    text = task_arithmetic({"base": f["base"], "chat": f["child0"], "tool": f["child0"]}, "tokenizer_source: base")
    recipe = Recipe.from_yaml(text.replace(f"  - {{model: {f['child0']}, parameters: {{weight: 0.5}}}}\n", ""))
    with pytest.raises(InputError) as error:
        MergeSession(recipe.model_refs()).materialize(recipe)
    assert str(error.value) == (
        f"<text>: {f['base']}: its tokenizer has 4 token(s) past its vocab_size 40 and is WordLevel: only a BPE "
        "tokenizer's can be cut for a tokenizer merge"
    )


def test_tied_embeddings_are_aligned_once(tiny_tied_family, tmp_path):
    """No lm_head.weight to align: the embeddings (44 of their 48 rows have a token) are the head too."""
    f = tiny_tied_family
    text = f"""
merge_method: linear
base_model: {f["base"]}
models:
  - {{model: {f["base"]}, parameters: {{weight: 0.5}}}}
  - {{model: {f["child0"]}, parameters: {{weight: 0.5}}}}
dtype: float32
tokenizer_source: base
"""
    recipe = Recipe.from_yaml(text)
    out = MergeSession(recipe.model_refs()).write(recipe, tmp_path / "ours")
    theirs = mergekit_merge(text, tmp_path / "mk")
    ours = load_dir(out)
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" not in ours
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
    assert ours["model.embed_tokens.weight"].shape[0] == CHARS
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mk" / "config.json").read_text())
