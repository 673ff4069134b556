"""End-to-end parity: MergeSession (materialize / apply / write / `evomerge merge`) against mergekit's own merge.

mergekit 0.1.5's in-process `run_merge` is the oracle; a deterministic method must match it bit for bit
(tolerance 0), and DARE/DELLA too on CPU with the same seed, since evomerge draws its masks in mergekit's order.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merge_core import MergeSession, Recipe
from merge_core.sources import weight_files


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(Path(path)):
        tensors.update(load_file(file))
    return tensors


def mergekit_merge(recipe_yaml: str, out: Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_yaml))
    run_merge(config, str(out), MergeOptions(random_seed=seed, quiet=True, write_model_card=False))
    return load_dir(out)


def recipes(f: dict) -> dict[str, str]:
    """Recipes that exercise every method, gradients, filters, slices, negative weights and dtypes."""
    b, c0, c1, c2 = f["base"], f["child0"], f["child1"], f["child2"]
    return {
        "linear": f"""
merge_method: linear
models:
  - {{model: {c0}, parameters: {{weight: [0.2, 0.9, 0.4]}}}}
  - {{model: {c1}, parameters: {{weight: [{{filter: self_attn, value: 0.7}}, {{value: 0.3}}]}}}}
  - {{model: {c2}, parameters: {{weight: -0.2}}}}
dtype: float32
""",
        "task_arithmetic_bf16": f"""
merge_method: task_arithmetic
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: [1.0, 0.5]}}}}
  - {{model: {c1}, parameters: {{weight: 0.6}}}}
  - {{model: {c2}, parameters: {{weight: -0.3}}}}
parameters: {{lambda: 0.8}}
dtype: bfloat16
""",
        "ties": f"""
merge_method: ties
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 1.0, density: [0.3, 0.8]}}}}
  - {{model: {c1}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {c2}, parameters: {{weight: [{{filter: mlp, value: [0.2, 1.0]}}, {{value: 0.7}}], density: 0.6}}}}
dtype: float32
out_dtype: bfloat16
""",
        "breadcrumbs_ties": f"""
merge_method: breadcrumbs_ties
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.7, density: 0.8, gamma: 0.05}}}}
  - {{model: {c1}, parameters: {{weight: 0.4, density: 0.6}}}}
dtype: float32
""",
        "slerp_slices": f"""
merge_method: slerp
base_model: {b}
slices:
  - sources:
      - {{model: {b}, layer_range: [0, 2]}}
      - {{model: {c0}, layer_range: [0, 2]}}
  - sources:
      - {{model: {b}, layer_range: [2, 4]}}
      - {{model: {c0}, layer_range: [2, 4]}}
    parameters: {{t: [{{filter: self_attn, value: [0.1, 0.9]}}, {{value: 0.6}}]}}
parameters: {{t: 0.3}}
dtype: float32
""",
        "nuslerp": f"""
merge_method: nuslerp
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.3}}}}
  - {{model: {c1}, parameters: {{weight: 0.9}}}}
dtype: float32
""",
        "model_stock": f"""
merge_method: model_stock
base_model: {b}
models:
  - {{model: {c0}}}
  - {{model: {c1}}}
  - {{model: {c2}}}
dtype: float32
""",
        "passthrough_stack": f"""
merge_method: passthrough
slices:
  - sources: [{{model: {b}, layer_range: [0, 3]}}]
  - sources: [{{model: {c1}, layer_range: [1, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}]
dtype: float32
""",
        "dare_ties": f"""
merge_method: dare_ties
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.8, density: 0.5}}}}
  - {{model: {c1}, parameters: {{weight: 0.6, density: [0.3, 0.9]}}}}
dtype: float32
""",
        "della": f"""
merge_method: della
base_model: {b}
models:
  - {{model: {c0}, parameters: {{weight: 0.8, density: 0.5, epsilon: 0.1}}}}
  - {{model: {c1}, parameters: {{weight: 0.6, density: 0.6}}}}
parameters: {{lambda: 1.1}}
dtype: float32
""",
    }


@pytest.fixture(scope="module")
def session(tiny_family):
    return MergeSession(list(tiny_family.values()))


@pytest.mark.parametrize("name", list(recipes({"base": "b", "child0": "", "child1": "", "child2": ""})))
def test_materialize_equals_mergekit(name, tiny_family, session, tmp_path):
    text = recipes(tiny_family)[name]
    ours = session.materialize(Recipe.from_yaml(text), seed=7)
    theirs = mergekit_merge(text, tmp_path / "mk", seed=7)
    assert sorted(ours) == sorted(theirs)
    for tensor_name, expected in theirs.items():
        assert ours[tensor_name].dtype == expected.dtype, tensor_name
        assert torch.equal(ours[tensor_name], expected), f"{name}: {tensor_name} differs"


def test_random_methods_depend_on_the_seed_only(tiny_family, session):
    recipe = Recipe.from_yaml(recipes(tiny_family)["dare_ties"])
    first, again, other = (session.materialize(recipe, seed=s) for s in (3, 3, 4))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])


def test_apply_writes_the_merge_into_a_live_model(tiny_family, session, tmp_path):
    text = recipes(tiny_family)["ties"].replace("out_dtype: bfloat16", "")
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"])
    session.apply(Recipe.from_yaml(text), model)
    expected = mergekit_merge(text, tmp_path / "mergekit")  # the oracle: mergekit's own output, not ours
    state = model.state_dict()
    assert set(expected) <= set(state)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_apply_rejects_non_finite_weights(tiny_family, session):
    from merge_core.errors import InputError

    recipe = Recipe.from_yaml(
        f"merge_method: linear\nmodels:\n  - {{model: {tiny_family['child0']}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {tiny_family['child1']}, parameters: {{weight: -1.0}}}}\n"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"])
    with pytest.raises(InputError, match="NaN or infinite"):
        session.apply(recipe, model)  # weights sum to 0: linear's normalisation divides by zero, as mergekit does


def test_recipe_from_another_session_is_an_error(tiny_family, tmp_path):
    from merge_core.errors import InputError

    small = MergeSession([tiny_family["base"], tiny_family["child0"]])
    with pytest.raises(InputError, match="not loaded in this session"):
        small.materialize(Recipe.from_yaml(recipes(tiny_family)["model_stock"]))


def test_write_is_a_loadable_sharded_checkpoint(tiny_family, session, tmp_path):
    recipe = Recipe.from_yaml(recipes(tiny_family)["passthrough_stack"])
    out = session.write(recipe, tmp_path / "out", shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["dtype"] == "float32"
    assert (out / "tokenizer.json").exists()
    assert Recipe.from_yaml(out / "mergekit_config.yml") == recipe
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging directory left behind

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    merged = session.materialize(recipe)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in merged.items())
    generated = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_tied_embeddings_round_trip(tiny_tied_family, tmp_path):
    f = tiny_tied_family
    text = f"""
merge_method: ties
base_model: {f["base"]}
models:
  - {{model: {f["child0"]}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {f["child1"]}, parameters: {{weight: 1.0, density: 0.5}}}}
"""
    session = MergeSession(list(f.values()))
    out = session.write(Recipe.from_yaml(text), tmp_path / "out")
    ours = load_dir(out)
    assert "lm_head.weight" not in ours
    theirs = mergekit_merge(text, tmp_path / "mk")
    assert all(torch.equal(ours[n], t) for n, t in theirs.items()) and sorted(ours) == sorted(theirs)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cli_merge_equals_mergekit_yaml_cli(tiny_family, tmp_path):
    """The round trip through the real command lines: Recipe -> YAML -> mergekit-yaml == evomerge merge."""
    recipe = Recipe.from_yaml(recipes(tiny_family)["dare_ties"])
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(recipe.to_yaml())
    bin_dir = Path(sys.executable).parent
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    subprocess.run([bin_dir / "evomerge", "merge", recipe_file, ours, "--seed", "11"], check=True)
    subprocess.run(
        [bin_dir / "mergekit-yaml", recipe_file, theirs, "--random-seed", "11", "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
    )
    ours_t, theirs_t = load_dir(ours), load_dir(theirs)
    assert sorted(ours_t) == sorted(theirs_t)
    assert all(torch.equal(ours_t[n], t) for n, t in theirs_t.items())


def copy_as(source: str, target: Path, layout: str) -> str:
    """The checkpoint at `source` rewritten as a sharded safetensors (index.json) or a .bin checkpoint."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_dir(Path(source))
    if layout == "bin":
        torch.save(tensors, target / "pytorch_model.bin")
        return str(target)
    names = sorted(tensors)
    shards = {name: f"model-{i % 3 + 1:05d}-of-00003.safetensors" for i, name in enumerate(names)}
    for shard in set(shards.values()):
        save_file({name: tensors[name] for name in names if shards[name] == shard}, target / shard)
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return str(target)


def test_sharded_and_bin_sources_merge_like_their_single_file_originals(tiny_family, tmp_path):
    text = recipes(tiny_family)["ties"].replace("out_dtype: bfloat16", "")
    expected = mergekit_merge(text, tmp_path / "mergekit")  # mergekit on the single-file originals
    sharded = copy_as(tiny_family["child0"], tmp_path / "sharded", "sharded")
    binary = copy_as(tiny_family["child1"], tmp_path / "bin", "bin")
    assert len(list(Path(sharded).glob("*.safetensors"))) == 3 and not list(Path(binary).glob("*.safetensors"))
    recipe = Recipe.from_yaml(text.replace(tiny_family["child0"], sharded).replace(tiny_family["child1"], binary))
    merged = MergeSession(recipe.model_refs()).materialize(recipe)
    assert sorted(merged) == sorted(expected)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


@pytest.fixture(scope="module")
def out_of_core(tiny_family):
    return MergeSession(list(tiny_family.values()), out_of_core=True)


@pytest.mark.parametrize("name", list(recipes({"base": "b", "child0": "", "child1": "", "child2": ""})))
def test_an_out_of_core_merge_equals_the_resident_one(name, tiny_family, session, out_of_core):
    """`evomerge merge` reads every input tensor from disk when it is merged; the result must not change."""
    recipe = Recipe.from_yaml(recipes(tiny_family)[name])
    ours, resident = out_of_core.materialize(recipe, seed=7), session.materialize(recipe, seed=7)
    assert list(ours) == list(resident)  # the same order too: random methods draw tensor by tensor in order
    assert all(torch.equal(ours[tensor_name], tensor) for tensor_name, tensor in resident.items())
    assert not any(
        isinstance(t, torch.Tensor) for c in out_of_core.checkpoints.values() for t in vars(c.tensors).values()
    )


def test_out_of_core_reads_sharded_and_bin_sources(tiny_family, tmp_path):
    text = recipes(tiny_family)["ties"].replace("out_dtype: bfloat16", "")
    sharded = copy_as(tiny_family["child0"], tmp_path / "sharded", "sharded")
    binary = copy_as(tiny_family["child1"], tmp_path / "bin", "bin")
    recipe = Recipe.from_yaml(text.replace(tiny_family["child0"], sharded).replace(tiny_family["child1"], binary))
    expected = MergeSession(recipe.model_refs()).materialize(recipe)
    merged = MergeSession(recipe.model_refs(), out_of_core=True).materialize(recipe)
    assert sorted(merged) == sorted(expected)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)
