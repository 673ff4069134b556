"""Recipes: mergekit YAML in, the same YAML out (accepted by mergekit itself), and one-line errors for bad input."""

import pytest
import yaml
from mergekit.config import MergeConfiguration

from merge_core.errors import InputError
from merge_core.recipe import Recipe

GOOD = {
    "linear_gradient_filter_negative": """
merge_method: linear
models:
  - {model: org/a, parameters: {weight: [0.2, 0.9, 0.4]}}
  - {model: ./b, parameters: {weight: [{filter: self_attn, value: 0.7}, {value: -0.3}]}}
  - {model: /abs/c, parameters: {weight: -0.2}}
parameters: {normalize: false}
dtype: float32
""",
    "ties_nested_gradient_in_filter": """
merge_method: ties
base_model: base
models:
  - {model: c0, parameters: {weight: 1, density: [0.3, 0.8]}}
  - {model: c1, parameters: {weight: 0.5, density: 1e-3}}
  - {model: c2, parameters: {weight: [{filter: mlp, value: [0.2, 1.0]}, {filter: "*", value: 0.7}]}}
parameters: {lambda: 0.8, density: 0.5, int8_mask: true}
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
name: my-ties
""",
    "slerp_slices": """
merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 2]}
      - {model: other, layer_range: [0, 2]}
  - sources:
      - {model: base, layer_range: [2, 4]}
      - {model: other, layer_range: [2, 4]}
    parameters: {t: [{filter: self_attn, value: [0.1, 0.9]}, {value: 0.6}]}
parameters: {t: 0.3}
dtype: float64
chat_template: chatml
""",
    "passthrough_stack": """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: b, layer_range: [1, 4], parameters: {scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]}}]
""",
    "della_top_level_per_model": """
merge_method: della
base_model: base
models:
  - {model: base}
  - {model: c0, parameters: {epsilon: 0.05}}
  - {model: c1}
parameters: {weight: 0.5, density: [0.4, 0.7], lambda: 1.1, normalize: true, rescale: false}
tokenizer_source: c0
""",
    "model_stock_switch": """
merge_method: model_stock
base_model: base
models: [{model: c0}, {model: c1}, {model: c2}]
parameters: {filter_wise: [{filter: mlp, value: true}, {value: false}]}
""",
    "exact_floats": """
merge_method: task_arithmetic
base_model: base
models:
  - {model: c0, parameters: {weight: 0.30000000000000004}}
  - {model: c1, parameters: {weight: [1.0e-300, 123456789.123456789, -2.5e+20, 0.1]}}
""",
    "tokenizer_block": """
merge_method: task_arithmetic
base_model: base
models: [{model: c0, parameters: {weight: 1}}]
tokenizer:
  source: union
  tokens:
    "<|im_start|>": {source: {kind: zero}}
    "<|im_end|>": {source: c0, force: true}
    "<x>": {source: {kind: model_token, model: base, token_id: 3}}
  pad_to_multiple_of: 64
""",
    "nuslerp_single_filter_entry": """
merge_method: nuslerp
models:
  - {model: a, parameters: {weight: {filter: mlp, value: 0.3}}}
  - {model: b, parameters: {weight: 0.9}}
parameters: {weight: 0.5, nuslerp_row_wise: true}
""",
}


@pytest.mark.parametrize("name", list(GOOD))
def test_round_trip_through_mergekit(name):
    recipe = Recipe.from_yaml(GOOD[name])
    text = recipe.to_yaml()
    MergeConfiguration.model_validate(yaml.safe_load(text))  # mergekit accepts what we write
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text
    assert "null" not in text and "{}" not in text


def test_written_yaml_is_minimal_and_exact():
    recipe = Recipe.from_yaml(GOOD["exact_floats"])
    data = yaml.safe_load(recipe.to_yaml())
    assert list(data) == ["merge_method", "base_model", "models"]  # nothing the recipe did not set
    assert data["models"][0] == {"model": "c0", "parameters": {"weight": 0.30000000000000004}}
    assert data["models"][1]["parameters"]["weight"] == [1e-300, 123456789.12345679, -2.5e20, 0.1]
    # PyYAML reads "1e-3" as a string; it is a number in mergekit and here.
    ties = Recipe.from_yaml(GOOD["ties_nested_gradient_in_filter"])
    assert ties.models[1].parameters["density"] == 0.001
    assert "  - {model" not in recipe.to_yaml() and "weight: [1.0e-300, " in recipe.to_yaml()


def test_model_refs_in_merge_order_base_last():
    assert Recipe.from_yaml(GOOD["ties_nested_gradient_in_filter"]).model_refs() == ["c0", "c1", "c2", "base"]
    assert Recipe.from_yaml(GOOD["della_top_level_per_model"]).model_refs() == ["base", "c0", "c1"]
    assert Recipe.from_yaml(GOOD["passthrough_stack"]).model_refs() == ["a", "b"]


def test_file_path_and_where(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(GOOD["slerp_slices"])
    by_path, by_str = Recipe.from_yaml(path), Recipe.from_yaml(str(path))
    assert by_path.where == by_str.where == str(path)
    assert by_path == Recipe.from_yaml(GOOD["slerp_slices"])  # where it came from is not part of it
    path.write_text(GOOD["slerp_slices"].replace("t: 0.3", "t: true"))
    with pytest.raises(InputError) as error:
        Recipe.from_yaml(path)
    assert (
        str(error.value)
        == f"{path}: parameters.t: expected a number, a gradient list of numbers, or a filter list of them, not true/false"
    )
    with pytest.raises(InputError, match=r"^missing\.yml: file: not found$"):
        Recipe.from_yaml("missing.yml")
    with pytest.raises(
        InputError, match=r"^run-7: merge_method: expected a value, got nothing \(this field is required\)$"
    ):
        Recipe.from_dict({"models": [{"model": "a"}]}, where="run-7")


LINEAR_A = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
SLERP_SLICES = """
merge_method: slerp
base_model: a
parameters: {t: 0.5}
slices:
  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]
"""

# (recipe text, field path, a fragment of what was expected)
HOSTILE = [
    (LINEAR_A + "foo: 1", "foo", "unknown key; expected one of: name, merge_method"),
    ("base_model: a\ngate_mode: hidden\nexperts: [{source_model: b}]", "experts", "this is a mergekit-moe config"),
    ("merge_method: lineer\nmodels: [{model: a}]", "merge_method", "unknown method 'lineer'; expected one of linear"),
    (
        LINEAR_A + "slices: [{sources: [{model: a, layer_range: [0, 1]}]}]",
        "models",
        "exactly one of models:, slices: or modules:",
    ),
    ("merge_method: linear\nparameters: {weight: 1}", "models", "exactly one of models:, slices: or modules:"),
    ("merge_method: linear\nmodels: []", "models", "expected at least 1 item(s), got []"),
    (
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}, {model: c}]",
        "models[1].parameters.weight",
        "required by ties: set it here or in the top-level parameters",
    ),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: b}]", "parameters.t", "required by slerp"),
    (
        "merge_method: nuslerp\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]",
        "models",
        "nuslerp takes exactly 2 models besides base_model; got 1",
    ),
    (
        "merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]\nparameters: {t: 0.5}",
        "models",
        "slerp takes exactly 2 inputs counting base_model; got 3",
    ),
    (
        "merge_method: model_stock\nbase_model: a\nmodels: [{model: b}]",
        "models",
        "model_stock takes at least 3 inputs counting base_model; got 2",
    ),
    (
        "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
        "  - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]",
        "slices[1].sources",
        "passthrough takes exactly 1 input per slice; got 2",
    ),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "base_model", "required by ties"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]", "models[0].parameters.weight", "finite"),
    (
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: [0.5, .inf]}}]",
        "models[0].parameters.density",
        "expected a finite number, got inf",
    ),
    (
        SLERP_SLICES + "  - sources: [{model: a, layer_range: [3, 3]}, {model: b, layer_range: [3, 3]}]",
        "slices[1].sources[0].layer_range",
        "0 <= start < end",
    ),
    (
        SLERP_SLICES.replace("[0, 2]}, {model: b", "[-1, 2]}, {model: b"),
        "slices[0].sources[0].layer_range",
        "got [-1, 2]",
    ),
    (
        SLERP_SLICES.replace("b, layer_range: [0, 2]", "b, layer_range: [0, 3]"),
        "slices[0].sources[1].layer_range",
        "spans 3 layers but slices[0].sources[0] spans 2",
    ),
    (SLERP_SLICES.replace("[0, 2]}]", "[0, 2, 4]}]"), "slices[0].sources[1].layer_range", "expected [start, end]"),
    (
        SLERP_SLICES.replace("{model: a, layer_range", "{model: c, layer_range"),
        "slices[0].sources",
        "must include base_model 'a'",
    ),
    (SLERP_SLICES + "    base_model: c", "slices[0].sources", "must include base_model 'c'"),
    (SLERP_SLICES.replace("base_model: a\n", ""), "slices[0].base_model", "required by slerp (set it here or at"),
    (
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: true}}]",
        "models[0].parameters.weight",
        "not true/false",
    ),
    (LINEAR_A + "parameters: {normalize: 1}", "parameters.normalize", "expected true or false"),
    (
        LINEAR_A.replace("{weight: 1}", "{weight: 1, densty: 0.5}"),
        "models[0].parameters.densty",
        "not a parameter of linear; expected one of weight, normalize",
    ),
    (
        SLERP_SLICES.replace(
            "{model: b, layer_range: [0, 2]}", "{model: b, layer_range: [0, 2], parameters: {t: 0.1}}"
        ),
        "slices[0].sources[1].parameters.t",
        "one value for all inputs",
    ),
    (
        LINEAR_A.replace("{model: a,", "{model: a+lora+more,"),
        "models[0].model",
        "expected MODEL or MODEL+LORA_ADAPTER, got 'a+lora+more'",
    ),
    (
        LINEAR_A.replace("{model: a,", "{model: 7,"),
        "models[0].model",
        "expected a model directory or hub id (a string), got 7",
    ),
    (
        LINEAR_A.replace("parameters:", "paramters:"),
        "models[0].paramters",
        "unknown key; expected one of: model, parameters",
    ),
    (LINEAR_A + "tokenizer_source: union\ntokenizer: {source: union}", "tokenizer", "not both"),
    (LINEAR_A + "tokenizer_source: base", "tokenizer_source", "'base' needs a base_model"),
    (
        "merge_method: linear\nmodules: {text: {models: [{model: a, parameters: {weight: 1}}]}}",
        "modules",
        "expected one module named default (mergekit's name for a decoder-only model's one module; multi-module "
        "models are not supported), got text",
    ),
    ("merge_method: linear\nmodules: {default: {parameters: {weight: 1}}}", "modules.default", "exactly one of"),
    (
        "merge_method: ties\nmodules: {default: {models: [{model: b, parameters: {weight: 1}}]}}",
        "base_model",
        "required by ties",
    ),
    (LINEAR_A + "tokenizer: {source: base}", "tokenizer.source", "'base' needs a base_model"),
    (
        LINEAR_A + "tokenizer: {tokens: {x: {source: {kind: model_token, model: zz, token: y}}}}",
        "tokenizer.tokens.x.source.model",
        "'zz' is not a model of this recipe",
    ),
    (LINEAR_A + "tokenizer: {tokens: {x: {source: {kind: zer0}}}}", "tokenizer.tokens.x.source.kind", "got 'zer0'"),
    (LINEAR_A + "dtype: fp8", "dtype", "expected one of 'bfloat16', 'float16', 'float32' or 'float64', got 'fp8'"),
    (
        "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n  - model: b\n  - model: a",
        "models[2].model",
        "'a' is already an input",
    ),
    (
        LINEAR_A.replace("{weight: 1}", "{weight: [{filter: mlp}]}"),
        "models[0].parameters.weight",
        "entry 0: missing value",
    ),
    (
        LINEAR_A.replace("{weight: 1}", "{weight: [[1, 2]]}"),
        "models[0].parameters.weight",
        "expected a number, got [1, 2]",
    ),
    (
        LINEAR_A.replace("{weight: 1}", "{weight: abc}"),
        "models[0].parameters.weight",
        "expected a number, true/false, a gradient",
    ),
    (
        "merge_method: linear\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]",
        "base_model",
        "linear reads weight for every input and base_model is one",
    ),
    (
        "merge_method: linear\nparameters: {weight: 1}\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
        "  - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]",
        "slices[1].sources",
        "has more sources than slices[0] (1)",
    ),
    ("- merge_method: linear", "recipe", "expected a mapping with merge_method"),
    ("merge_method: linear\nmodels: [{model: a}\nparameters: {weight: 1}", "line 3", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "field", "expected"), HOSTILE, ids=[case[1] for case in HOSTILE])
def test_hostile_recipe_is_one_clear_line(text, field, expected):
    with pytest.raises(InputError) as error:
        Recipe.from_yaml(text)
    message = str(error.value)
    assert message.startswith(f"<text>: {field}: "), message
    assert expected in message, message
    assert "\n" not in message and error.value.field == field
