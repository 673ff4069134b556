"""Recipes mergekit 0.1.5 merges that evomerge used to crash on, ignore, or refuse: frankenmerges that reuse a
layer, `chat_template`, and the keys mergekit takes without reading. Each is checked against mergekit's own
output: tensors with tolerance 0, config.json, and the tokenizer files byte for byte.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from test_session import load_dir, mergekit_merge
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from merge_core import MergeSession, Recipe
from merge_core.chat_template import CHATML
from merge_core.errors import InputError

# What a merge writes besides the tokenizer; mergekit's tokenizer rewrite also drops generation_config.json,
# which evomerge keeps.
NOT_TOKENIZER = {"config.json", "model.safetensors", "mergekit_config.yml", "generation_config.json"}


@pytest.fixture(scope="module")
def session(tiny_family):
    return MergeSession(list(tiny_family.values()))


def frankenmerge(f: dict) -> str:
    """A self-merge in the style of the 120B ones: layers 1 and 2 of the base appear twice, then child0 on top."""
    return f"""
merge_method: passthrough
slices:
  - sources: [{{model: {f["base"]}, layer_range: [0, 3]}}]
  - sources: [{{model: {f["base"]}, layer_range: [1, 4]}}]
  - sources: [{{model: {f["child0"]}, layer_range: [2, 4], parameters: {{scale: [{{filter: o_proj, value: 0.0}}, {{value: 1.0}}]}}}}]
dtype: float32
"""


@pytest.mark.parametrize("shard_bytes", [None, 40_000], ids=["one-file", "sharded"])
def test_frankenmerge_reusing_layers_writes_what_mergekit_writes(tiny_family, session, tmp_path, shard_bytes):
    text = frankenmerge(tiny_family)
    recipe = Recipe.from_yaml(text)
    options = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    out = session.write(recipe, tmp_path / "ours", **options)
    theirs = mergekit_merge(text, tmp_path / "mk")
    ours = load_dir(out)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((tmp_path / "mk" / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 8


def test_frankenmerge_in_memory_shares_the_reused_layers(tiny_family, session):
    recipe = Recipe.from_yaml(frankenmerge(tiny_family))
    merged = session.materialize(recipe)
    # Output layers 1 and 3 are both the base's layer 1: the same tensor, not a copy.
    first, again = (merged[f"model.layers.{i}.mlp.up_proj.weight"] for i in (1, 3))
    assert first.data_ptr() == again.data_ptr()
    config = LlamaConfig.from_pretrained(tiny_family["base"], num_hidden_layers=8)
    model = AutoModelForCausalLM.from_config(config)
    session.apply(recipe, model)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in merged.items())


def linear(models: list[str], extra: str = "") -> str:
    entries = "".join(f"  - {{model: {model}, parameters: {{weight: 0.5}}}}\n" for model in models)
    return f"merge_method: linear\nmodels:\n{entries}dtype: float32\n{extra}"


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.name not in NOT_TOKENIZER}


def assert_same_tokenizer_files(ours: Path, theirs: Path) -> None:
    assert tokenizer_files(ours) == tokenizer_files(theirs)


JINJA = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"


@pytest.mark.parametrize(
    "setting, tokenizer_source",
    [("chatml", None), ("chatml", "child0"), (json.dumps(JINJA), None)],
    ids=["chatml", "chatml-tokenizer-source", "jinja-text"],
)
def test_chat_template_written_as_mergekit_writes_it(tiny_family, session, tmp_path, setting, tokenizer_source):
    extra = f"chat_template: {setting}\n"
    if tokenizer_source:
        extra += f"tokenizer_source: {tiny_family[tokenizer_source]}\n"
    text = linear([tiny_family["base"], tiny_family["child0"]], extra)
    out = session.write(Recipe.from_yaml(text), tmp_path / "ours")
    mergekit_merge(text, tmp_path / "mk")
    assert_same_tokenizer_files(out, tmp_path / "mk")
    assert (out / "generation_config.json").exists()  # kept, though mergekit's rewrite drops it
    expected = CHATML if setting == "chatml" else JINJA
    assert AutoTokenizer.from_pretrained(out).chat_template == expected


def with_template(source: str, target: Path, template: str | None) -> str:
    """A copy of the checkpoint at `source` whose tokenizer carries `template`."""
    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return str(target)


def test_auto_chat_template_picks_the_most_common_as_mergekit_does(tiny_family, tmp_path):
    common, rare = (
        "  {% for m in messages %}{{ m.content }}{% endfor %}\n",
        "{% for m in messages %}{{ m.role }}{% endfor %}",
    )
    models = [
        with_template(tiny_family["base"], tmp_path / "a", rare),
        with_template(tiny_family["child0"], tmp_path / "b", common),
        with_template(tiny_family["child1"], tmp_path / "c", common),
    ]
    text = linear(models, "chat_template: auto\n")
    recipe = Recipe.from_yaml(text)
    out = MergeSession(recipe.model_refs()).write(recipe, tmp_path / "ours")
    mergekit_merge(text, tmp_path / "mk")
    assert_same_tokenizer_files(out, tmp_path / "mk")
    assert (out / "chat_template.jinja").read_text() == common.strip()  # compared and written stripped


def test_auto_chat_template_tie_goes_to_the_first_model(tiny_family, tmp_path):
    first, second = (
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "{% for m in messages %}{{ m.role }}{% endfor %}",
    )
    models = [
        with_template(tiny_family["child0"], tmp_path / "a", first),
        with_template(tiny_family["child1"], tmp_path / "b", second),
    ]
    recipe = Recipe.from_yaml(linear(models, "chat_template: auto\n"))
    out = MergeSession(recipe.model_refs()).write(recipe, tmp_path / "ours")
    assert (out / "chat_template.jinja").read_text() == first  # mergekit's pick depends on a set's order


def test_auto_chat_template_without_any_leaves_the_tokenizer_as_it_is(tiny_family, session, tmp_path):
    text = linear([tiny_family["base"], tiny_family["child0"]], "chat_template: auto\n")
    out = session.write(Recipe.from_yaml(text), tmp_path / "ours")
    mergekit_merge(text, tmp_path / "mk")
    assert not (out / "chat_template.jinja").exists() and not (tmp_path / "mk" / "chat_template.jinja").exists()
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "mk" / "tokenizer.json").read_bytes()
    assert tokenizer_files(out) == tokenizer_files(Path(tiny_family["base"]))  # copied, not rewritten


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("alpaca", "'alpaca' is a template mergekit ships and evomerge does not: give its Jinja text instead"),
        (
            "vicuna",
            "expected auto, chatml, or the Jinja text of a template (20 characters or more, with a '{'), got 'vicuna'",
        ),
        (
            "'{{ x }}'",
            "expected auto, chatml, or the Jinja text of a template (20 characters or more, with a '{'), got '{{ x }}'",
        ),
        ("3", "expected auto, chatml, or the Jinja text of a template (20 characters or more, with a '{'), got 3"),
    ],
)
def test_chat_template_mergekit_would_refuse_is_one_line(setting, expected):
    text = linear(["a"], f"chat_template: {setting}\n")
    with pytest.raises(InputError) as error:
        Recipe.from_yaml(text)
    assert str(error.value) == f"<text>: chat_template: {expected}"


def ignored_keys(f: dict) -> dict[str, tuple[str, list[str]]]:
    """Recipes with keys mergekit 0.1.5 takes and never reads, and the warnings evomerge gives for them."""
    b, c0, c1, c2 = f["base"], f["child0"], f["child1"], f["child2"]
    return {
        "slerp_embed_slerp": (
            f"""
merge_method: slerp
base_model: {b}
models: [{{model: {b}}}, {{model: {c0}}}]
parameters: {{t: [0.2, 0.7], embed_slerp: true}}
dtype: float32
""",
            ["<text>: parameters.embed_slerp: has no effect: mergekit 0.1.5's slerp does not read it"],
        ),
        "model_stock_weight": (
            f"""
merge_method: model_stock
base_model: {b}
models: [{{model: {c0}}}, {{model: {c1}, parameters: {{weight: 0.2}}}}, {{model: {c2}}}]
parameters: {{weight: 0.7}}
dtype: float32
""",
            [
                "<text>: parameters.weight: has no effect: mergekit 0.1.5's model_stock does not read it",
                "<text>: models[1].parameters.weight: has no effect: mergekit 0.1.5's model_stock does not read it",
            ],
        ),
        "gradient_pattern": (
            f"""
merge_method: linear
models:
  - model: {c0}
    parameters:
      weight: [{{pattern: self_attn, value: [0.2, 0.9]}}, {{filter: mlp, pattern: up, value: 0.4}}, {{value: 0.8}}]
  - {{model: {c1}, parameters: {{weight: 0.5}}}}
dtype: float32
""",
            [
                "<text>: models[0].parameters.weight[0].pattern: has no effect: mergekit 0.1.5 ignores it, "
                "so this entry matches every tensor",
                "<text>: models[0].parameters.weight[1].pattern: has no effect: mergekit 0.1.5 ignores it, "
                "so this entry matches by filter 'mlp' alone",
            ],
        ),
        "residual_weight": (
            f"""
merge_method: passthrough
slices:
  - {{sources: [{{model: {c0}, layer_range: [0, 2]}}], residual_weight: 0.5}}
  - {{sources: [{{model: {c1}, layer_range: [2, 4]}}]}}
dtype: float32
""",
            ["<text>: slices[0].residual_weight: has no effect: mergekit 0.1.5 reads it nowhere"],
        ),
    }


def test_a_slice_with_its_own_base_model_merges_as_mergekit_merges_it(tiny_family, session, tmp_path):
    """TIES against the base in the first slices, against child0 in the last (mergekit's ConfigReader takes the
    slice's base_model before the top-level one, for the pre-layer tensors the first slice's, post the last's)."""
    b, c0, c1, c2 = (tiny_family[name] for name in ("base", "child0", "child1", "child2"))

    def sources(layers: list[int]) -> str:
        weights = {b: None, c0: None, c1: 0.7, c2: None}
        entries = [
            {"model": m, "layer_range": list(layers)} | ({"parameters": {"weight": w}} if w else {})
            for m, w in weights.items()
        ]
        return yaml.safe_dump(entries, default_flow_style=True).strip().replace("'", "")

    text = f"""
merge_method: ties
base_model: {b}
parameters: {{weight: 0.5, density: 0.6}}
slices:
  - sources: {sources([0, 2])}
  - sources: {sources([2, 4])}
    base_model: {c0}
dtype: float32
"""
    recipe = Recipe.from_yaml(text)
    ours = session.materialize(recipe)
    theirs = mergekit_merge(text, tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
    against_base = session.materialize(Recipe.from_yaml(text.replace(f"    base_model: {c0}\n", "")))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight", "lm_head.weight"):
        assert torch.equal(ours[name], against_base[name]) == (name == "model.layers.0.mlp.up_proj.weight"), name
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize("name", list(ignored_keys({"base": "", "child0": "", "child1": "", "child2": ""})))
def test_keys_mergekit_ignores_warn_and_merge_as_mergekit_does(name, tiny_family, session, tmp_path, caplog):
    text, warnings = ignored_keys(tiny_family)[name]
    with caplog.at_level(logging.WARNING, logger="merge_core"):
        recipe = Recipe.from_yaml(text)
    assert caplog.messages == warnings
    ours = session.materialize(recipe)
    theirs = mergekit_merge(text, tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[tensor_name], tensor) for tensor_name, tensor in theirs.items())
    # Written back as read, and mergekit reads the written recipe the same way.
    written = recipe.to_yaml()
    assert Recipe.from_yaml(written) == recipe
    assert MergeConfiguration.model_validate(yaml.safe_load(written)) == MergeConfiguration.model_validate(
        yaml.safe_load(text)
    )


def test_pattern_must_be_a_string():
    text = linear(["a"]).replace("weight: 0.5", "weight: [{pattern: [1], value: 0.5}]")
    with pytest.raises(InputError) as error:
        Recipe.from_yaml(text)
    assert str(error.value) == (
        "<text>: models[0].parameters.weight: entry 0: pattern: expected a string "
        "(mergekit ignores it: prefer filter), got [1]"
    )


def modules_recipes(f: dict) -> dict[str, str]:
    """mergekit's modules: syntax over the one module of a Llama, with a parameter level of its own between the
    slice's and the top level's (a filtered module entry falls through to the top level where it misses)."""
    b, c0, c1 = f["base"], f["child0"], f["child1"]
    return {
        "models": f"""
merge_method: ties
base_model: {b}
parameters: {{weight: 0.3, density: 0.9}}
modules:
  default:
    parameters: {{density: [{{filter: mlp, value: 0.4}}]}}
    models: [{{model: {b}}}, {{model: {c0}, parameters: {{weight: 0.8}}}}, {{model: {c1}}}]
dtype: float32
""",
        "slices": f"""
merge_method: linear
parameters: {{weight: 0.5}}
modules:
  default:
    parameters: {{weight: [0.1, 0.9]}}
    slices:
      - sources: [{{model: {c0}, layer_range: [0, 2]}}, {{model: {c1}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}]
      - sources: [{{model: {c0}, layer_range: [2, 4]}}, {{model: {c1}, layer_range: [2, 4]}}]
        parameters: {{weight: 0.7}}
dtype: float32
""",
    }


@pytest.mark.parametrize("name", ["models", "slices"])
def test_modules_syntax_merges_as_mergekit_merges_it(name, tiny_family, session, tmp_path):
    text = modules_recipes(tiny_family)[name]
    recipe = Recipe.from_yaml(text)
    ours = session.materialize(recipe)
    theirs = mergekit_merge(text, tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[tensor_name], tensor) for tensor_name, tensor in theirs.items())
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    # The module level is read: without it the merge differs.
    flat = yaml.safe_load(text)
    module = flat.pop("modules")["default"]
    module.pop("parameters")
    without = session.materialize(Recipe.from_dict(flat | module))
    assert not torch.equal(without["model.layers.1.mlp.up_proj.weight"], ours["model.layers.1.mlp.up_proj.weight"])
