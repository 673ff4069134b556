"""The planner: per-tensor sources and parameter values, by hand and against mergekit 0.1.5's own MergePlanner."""

import json
import shutil
from importlib import resources

import pytest
import torch
import yaml
from safetensors import safe_open

from merge_core import architecture
from merge_core.errors import InputError
from merge_core.plan import plan_merge
from merge_core.recipe import Recipe

LAYER = ("mlp.down_proj.weight", "self_attn.q_proj.weight")
# Five layers, listed sorted as a safetensors header lists them (layer 10 would sort before layer 2).
NAMES = sorted(
    ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    + [f"model.layers.{i}.{suffix}" for i in range(5) for suffix in LAYER]
)


def plan(text: str, names=NAMES, num_layers=5):
    return plan_merge(Recipe.from_yaml(text), names, num_layers, "<text>")


def jobs(text: str, **kwargs) -> dict:
    return {job.out_name: job for job in plan(text, **kwargs).jobs}


def test_layout_by_name_not_by_sorted_position():
    layout = architecture.layout(NAMES)
    assert layout.pre == ("model.embed_tokens.weight",)
    assert layout.post == ("lm_head.weight", "model.norm.weight")  # lm_head sorts first but is a post-weight
    assert layout.layer == tuple(f"model.layers.0.{suffix}" for suffix in LAYER)
    assert layout.num_layers == architecture.num_layers(NAMES) == 5
    neox = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.weight", "gpt_neox.layers.1.mlp.weight"]
    neox += ["gpt_neox.final_layer_norm.weight", "embed_out.weight"]
    assert architecture.layout(neox).post == ("gpt_neox.final_layer_norm.weight", "embed_out.weight")
    assert architecture.rename_layer("transformer.h.7.attn.c_attn.weight", 12) == "transformer.h.12.attn.c_attn.weight"
    assert architecture.layer_index("transformer.h.12.mlp.experts.3.w1") == 12


def test_layouts_that_cannot_be_merged():
    with pytest.raises(InputError, match=r"layer 3 does not have the same tensors as layer 0 \(model.layers.3.mlp"):
        architecture.layout([name for name in NAMES if name != "model.layers.3.mlp.down_proj.weight"])
    with pytest.raises(InputError, match="more than one layer stack"):
        architecture.layout(NAMES + ["vision.blocks.0.attn.weight"])


def test_pre_post_rule_matches_every_mergekit_architecture_table():
    checked = 0
    for file in resources.files("mergekit._data.architectures").iterdir():
        table = json.loads(file.read_text()) if file.name.endswith(".json") else {}
        if "pre_weights" not in table:
            continue  # multi-module (vision, encoder-decoder) tables: not merged by evomerge
        for weight in table["layer_templates"]["weights"]:
            assert architecture.layer_index(weight["name"].replace("${layer_index}", "17")) == 17, weight
        for kind in ("pre_weights", "post_weights"):
            for weight in table[kind]:
                if "${" in weight["name"] or architecture.layer_index(weight["name"]) is not None:
                    continue  # phi-1 numbers its embedding and head as extra layers
                assert architecture.is_pre_weight(weight["name"]) == (kind == "pre_weights"), (file.name, weight)
                checked += 1
    assert checked > 150


def test_gradient_follows_t_and_pre_post_weights_take_t0():
    merged = jobs(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: [0.0, 1.0, 4.0]}}, {model: b}]\n"
        "parameters: {weight: 1.0}"
    )
    for layer, expected in enumerate([0.0, 0.5, 1.0, 2.5, 4.0]):  # t = layer / 4 over the gradient's 3 points
        for suffix in LAYER:
            assert merged[f"model.layers.{layer}.{suffix}"].per_model["weight"] == (expected, 1.0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert merged[name].per_model["weight"] == (0.0, 1.0)
        assert merged[name].shared == {"normalize": True}


def test_t_restarts_per_slice_one_layer_slice_is_t1_and_pre_post_use_first_and_last_slice():
    text = """
merge_method: slerp
base_model: a
parameters: {t: [0.25, 0.75]}
slices:
  - sources: [{model: a, layer_range: [0, 3]}, {model: b, layer_range: [0, 3]}]
    parameters: {t: [{filter: embed, value: 0.125}]}
  - sources: [{model: a, layer_range: [3, 4]}, {model: b, layer_range: [3, 4]}]
  - sources: [{model: a, layer_range: [4, 5]}, {model: b, layer_range: [4, 5]}]
    parameters: {t: [{filter: norm, value: 0.875}]}
"""
    merged = jobs(text)
    expected = [0.25, 0.5, 0.75, 0.75, 0.75]
    assert [merged[f"model.layers.{i}.mlp.down_proj.weight"].shared["t"] for i in range(5)] == expected
    assert merged["model.embed_tokens.weight"].shared["t"] == 0.125  # first slice's filter
    assert merged["model.norm.weight"].shared["t"] == 0.875  # last slice's filter
    assert merged["lm_head.weight"].shared["t"] == 0.25  # falls through to the top level, at t = 0


def test_precedence_source_then_slice_then_top_level_then_default():
    text = """
merge_method: task_arithmetic
base_model: b
parameters: {weight: 2.0, lambda: 0.5}
slices:
  - sources:
      - {model: b, layer_range: [0, 5]}
      - {model: c0, layer_range: [0, 5], parameters: {weight: 0.125}}
      - {model: c1, layer_range: [0, 5]}
      - {model: c2, layer_range: [0, 5]}
    parameters: {weight: [{filter: c1-never-matches, value: 9.0}, {filter: self_attn, value: 0.25}], normalize: true}
"""
    merged = jobs(text)
    attention, mlp = merged["model.layers.2.self_attn.q_proj.weight"], merged["model.layers.2.mlp.down_proj.weight"]
    assert attention.per_model["weight"] == (None, 0.125, 0.25, 0.25)  # the base's weight is never read
    assert mlp.per_model["weight"] == (None, 0.125, 2.0, 2.0)
    assert mlp.per_model["density"] == (None, 1.0, 1.0, 1.0)  # method default
    assert mlp.shared == {"normalize": True, "rescale": False, "lambda": 0.5, "int8_mask": False}
    assert mlp.base_index == 0


def test_per_model_filters_see_input_names_shared_filters_see_output_names():
    text = """
merge_method: task_arithmetic
base_model: b
slices:
  - sources:
      - {model: b, layer_range: [2, 4]}
      - {model: c, layer_range: [2, 4], parameters: {weight: [{filter: layers.3., value: 0.5}, {value: 1.0}]}}
parameters: {lambda: [{filter: layers.1., value: 3.0}, {value: 1.0}]}
"""
    merged = jobs(text)
    first, second = merged["model.layers.0.mlp.down_proj.weight"], merged["model.layers.1.mlp.down_proj.weight"]
    assert first.sources == (("b", "model.layers.2.mlp.down_proj.weight"), ("c", "model.layers.2.mlp.down_proj.weight"))
    assert (first.per_model["weight"], first.shared["lambda"]) == ((None, 1.0), 1.0)
    assert (second.per_model["weight"], second.shared["lambda"]) == ((None, 0.5), 3.0)


def test_stacked_slices_renumber_layers_and_set_depth():
    text = """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources: [{model: b, layer_range: [1, 4], parameters: {scale: [{filter: layers.1., value: 0.0}]}}]
"""
    result = plan(text)
    assert result.num_hidden_layers == 6 and result.models == ("a", "b") and result.base_model is None
    names = [job.out_name for job in result.jobs]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["lm_head.weight", "model.norm.weight"]
    assert names[1:-2] == [f"model.layers.{i}.{suffix}" for i in range(6) for suffix in LAYER]
    merged = {job.out_name: job for job in result.jobs}
    third = merged["model.layers.3.self_attn.q_proj.weight"]
    assert third.sources == (("b", "model.layers.1.self_attn.q_proj.weight"),)
    assert third.per_model["scale"] == (0.0,) and merged["model.layers.4.mlp.down_proj.weight"].per_model == {
        "scale": (1.0,)
    }
    assert merged["model.norm.weight"].sources == (("b", "model.norm.weight"),)  # post-weights: last slice
    assert merged["model.embed_tokens.weight"].sources == (("a", "model.embed_tokens.weight"),)


def test_base_appended_last_and_dtypes():
    result = plan(
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1.0}}, {model: c}]\n"
        "parameters: {weight: 0.5}\ndtype: bfloat16\nout_dtype: float16"
    )
    job = result.jobs[0]
    assert job.sources[2] == ("b", job.out_name) and job.base_index == 2
    assert job.per_model["weight"] == (1.0, 0.5, None)
    assert (result.dtype, result.out_dtype, result.models) == (torch.bfloat16, torch.float16, ("a", "c", "b"))
    linear = plan("merge_method: linear\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 0.5}")
    assert linear.jobs[0].per_model["weight"] == (0.5, 0.5) and linear.dtype is None  # base is a plain input


def test_plan_time_errors_name_the_field():
    with pytest.raises(InputError) as error:
        plan("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 6]}]}]")
    assert str(error.value) == "<text>: slices[0].sources[0].layer_range: ends at layer 6 but a has 5 layers"
    with pytest.raises(InputError) as error:
        plan("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: mlp, value: 1.0}]}}]")
    assert str(error.value) == (
        "<text>: models[0].parameters.weight: no filter entry matches tensor model.embed_tokens.weight and "
        "linear has no default: add a {value: ...} entry"
    )
    with pytest.raises(InputError, match="hold 5 layers but the model config says 4"):
        plan("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]", num_layers=4)


# --- the oracle: mergekit's own planner on real checkpoints ---------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("family")
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "b")
    for child in ("c0", "c1", "c2"):  # planning reads names and configs only: copies are enough
        shutil.copytree(root / "b", root / child)
    return {name: str(root / name) for name in ("b", "c0", "c1", "c2")}


ORACLE = {
    "ties_gradients_filters": """
merge_method: ties
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: [1.0, 0.5], density: [0.3, 0.8]}}}}
  - {{model: {c1}, parameters: {{weight: 0.5}}}}
  - {{model: {c2}, parameters: {{weight: [{{filter: mlp, value: [0.2, 1.0, 0.1]}}, {{value: 0.7}}], density: 0.6}}}}
parameters: {{density: 0.9, lambda: [{{filter: layers.2., value: 2.0}}, {{value: 1.5}}], normalize: false}}
""",
    "linear_base_listed_in_the_middle": """
merge_method: linear
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: -0.25}}}}
  - {{model: {b}, parameters: {{weight: [0.1, 0.2, 0.3, 0.4]}}}}
  - {{model: {c1}}}
parameters: {{weight: 0.3, normalize: [{{filter: lm_head, value: false}}, {{value: true}}]}}
""",
    "slerp_three_slices_one_layer": """
merge_method: slerp
base_model: {b}
parameters: {{t: [0.1, 0.7, 0.4]}}
slices:
  - sources: [{{model: {b}, layer_range: [0, 2]}}, {{model: {c0}, layer_range: [0, 2]}}]
    parameters: {{t: [{{filter: embed, value: 0.9}}, {{filter: self_attn, value: [0.2, 0.6]}}]}}
  - sources: [{{model: {b}, layer_range: [1, 2]}}, {{model: {c0}, layer_range: [1, 2]}}]
  - sources: [{{model: {b}, layer_range: [2, 4]}}, {{model: {c0}, layer_range: [2, 4]}}]
    parameters: {{t: [{{filter: norm, value: 0.35}}]}}
""",
    "passthrough_stack_input_name_filter": """
merge_method: passthrough
parameters: {{scale: [{{filter: o_proj, value: 0.5}}]}}
slices:
  - sources: [{{model: {c0}, layer_range: [0, 3]}}]
    parameters: {{scale: [0.9, 1.1]}}
  - sources: [{{model: {c1}, layer_range: [1, 4], parameters: {{scale: [{{filter: layers.1., value: 0.0}}]}}}}]
""",
    "task_arithmetic_shifted_sources_precedence": """
merge_method: task_arithmetic
base_model: {b}
parameters: {{weight: 2.0, lambda: [0.5, 1.5]}}
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {c0}, layer_range: [2, 4], parameters: {{weight: [{{filter: layers.3., value: 0.125}}]}}}}
      - {{model: {c1}, layer_range: [1, 3]}}
    parameters: {{weight: [{{filter: self_attn, value: [0.25, 0.75]}}]}}
  - sources:
      - {{model: {b}, layer_range: [2, 4]}}
      - {{model: {c0}, layer_range: [0, 2]}}
      - {{model: {c1}, layer_range: [2, 4], parameters: {{weight: -1.0}}}}
""",
    "della_and_epsilon": """
merge_method: della
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.8, density: 0.5, epsilon: [0.1, 0.2]}}}}
  - {{model: {c1}, parameters: {{weight: 0.6}}}}
parameters: {{density: [{{filter: up_proj, value: 0.4}}, {{value: 0.6}}], rescale: false}}
""",
    "breadcrumbs_gamma": """
merge_method: breadcrumbs_ties
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.7, density: 0.8, gamma: 0.05}}}}
  - {{model: {c1}, parameters: {{weight: 0.4, density: 0.6}}}}
""",
    "nuslerp_with_base": """
merge_method: nuslerp
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: [0.3, 0.6]}}}}
  - {{model: {c1}, parameters: {{weight: 0.9}}}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: [{{filter: mlp, value: true}}, {{value: false}}]}}
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {b}
models: [{{model: {c0}}}, {{model: {c1}}}, {{model: {c2}}}]
parameters: {{filter_wise: [{{filter: self_attn, value: true}}]}}
""",
}


def mergekit_plan(text: str, out_dir: str) -> dict[str, tuple]:
    """Per output tensor: (sources, base index, shared values, per-model values) as mergekit 0.1.5 plans them."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import AutoConfig

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions()
    LoaderCache().setup(options=options)
    donor = AutoConfig.from_pretrained(str(config.base_model or config.referenced_models()[0]))
    planner = MergePlanner(config, get_architecture_info(config, options), options=options, out_model_config=donor)
    result = {}
    for task in planner.plan_to_disk(out_dir):  # plans only: nothing runs or is written
        if not isinstance(task, SaveTensor):
            continue
        merge = task.tensor_task
        order = [str(model) for model in merge.model_order]
        names = {str(model): info.name for model, info in merge.gather_tensors.weight_info.items()}
        base = str(merge.base_model) if merge.base_model else None
        result[task.tensor_name] = (
            tuple((model, names[model]) for model in order),
            order.index(base) if base in order else None,
            typed(dict(merge.parameters.items())),
            {str(model): typed(dict(values.items())) for model, values in merge.input_parameters.items()},
        )
    return result


def typed(values: dict) -> dict:
    """Values with their types, so that True never equals 1.0. mergekit's passthrough defaults `scale` to None
    (no scaling), which evomerge declares as 1.0: the same tensor comes out."""
    values = {name: 1.0 if name == "scale" and value is None else value for name, value in values.items()}
    return {name: (type(value).__name__, value) for name, value in values.items()}


@pytest.mark.parametrize("name", list(ORACLE))
def test_resolved_parameters_equal_mergekits(family, name, tmp_path):
    text = ORACLE[name].format(**family)
    with safe_open(f"{family['b']}/model.safetensors", "pt") as checkpoint:
        tensor_names = list(checkpoint.keys())
    ours = plan_merge(Recipe.from_yaml(text), tensor_names, 4, "<text>")
    expected = mergekit_plan(text, str(tmp_path / "never-written"))
    got = {}
    for job in ours.jobs:
        per_model = {
            model: typed({key: values[index] for key, values in job.per_model.items() if values[index] is not None})
            for index, (model, _) in enumerate(job.sources)
        }
        got[job.out_name] = (job.sources, job.base_index, typed(job.shared), per_model)
    assert got == expected
    depth = 1 + max(architecture.layer_index(name) for name in expected if architecture.layer_index(name) is not None)
    assert ours.num_hidden_layers == depth
