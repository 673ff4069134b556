"""LoRA references (`model+adapter`): real PEFT adapters, folded as PEFT's merge_and_unload folds them, and
merges over them equal to mergekit 0.1.5's (which folds through PEFT) at tolerance 0."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from test_session import load_dir
from transformers import AutoModelForCausalLM

from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from merge_core.sources import load_checkpoint


def make_adapter(model_dir: str, out: Path, seed: int, **options) -> Path:
    """A PEFT LoRA adapter for `model_dir` with random B (PEFT initialises it to zero: a no-op adapter)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **options)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    return out


@pytest.fixture(scope="module")
def adapters(tiny_family, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": str(make_adapter(tiny_family["child0"], root / "plain", seed=1)),
        "rslora": str(make_adapter(tiny_family["child1"], root / "rslora", seed=2, use_rslora=True)),
    }


@pytest.mark.parametrize(("child", "kind"), [("child0", "plain"), ("child1", "rslora")])
def test_a_lora_reference_is_the_model_peft_merge_and_unload_makes(tiny_family, adapters, child, kind):
    ours = load_checkpoint(f"{tiny_family[child]}+{adapters[kind]}").tensors
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_family[child]), adapters[kind])
    theirs = peft_model.merge_and_unload().state_dict()
    plain = load_checkpoint(tiny_family[child]).tensors
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    changed = {name for name in ours if not torch.equal(ours[name], plain[name])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(4) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip


def mergekit_with_loras(recipe_yaml: str, out: Path, cache: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_yaml))
    options = MergeOptions(lora_merge_cache=str(cache), quiet=True, write_model_card=False)
    run_merge(config, str(out), options)
    return load_dir(out)


def test_a_merge_over_lora_references_writes_what_mergekit_writes(tiny_family, adapters, tmp_path):
    recipe = f"""
merge_method: ties
base_model: {tiny_family["base"]}
models:
  - {{model: "{tiny_family["child0"]}+{adapters["plain"]}", parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: "{tiny_family["child1"]}+{adapters["rslora"]}", parameters: {{weight: 0.4, density: 0.7}}}}
  - {{model: {tiny_family["child2"]}, parameters: {{weight: 0.3, density: 0.5}}}}
dtype: float32
"""
    parsed = Recipe.from_yaml(recipe)
    session = MergeSession(parsed.model_refs())
    out = session.write(parsed, tmp_path / "ours")
    theirs = mergekit_with_loras(recipe, tmp_path / "mergekit", tmp_path / "lora-cache")
    ours = load_dir(out)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tmp_path / "mergekit" / "config.json").read_text()
    )
    # `evomerge merge` reads tensors on demand and folds each adapted one as it is read: the same merge.
    streamed = load_dir(MergeSession(parsed.model_refs(), out_of_core=True).write(parsed, tmp_path / "streamed"))
    assert all(torch.equal(streamed[name], tensor) for name, tensor in theirs.items())
    # The adapters matter: the same merge without them differs.
    bare = MergeSession([tiny_family[n] for n in ("base", "child0", "child1", "child2")]).materialize(
        Recipe.from_yaml(recipe.replace(f"+{adapters['plain']}", "").replace(f"+{adapters['rslora']}", ""))
    )
    assert not torch.equal(
        bare["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.0.self_attn.q_proj.weight"]
    )


def edited_adapter(source: str, out: Path, **config_edits) -> str:
    out.mkdir()
    config = json.loads((Path(source) / "adapter_config.json").read_text()) | config_edits
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "adapter_model.safetensors").write_bytes((Path(source) / "adapter_model.safetensors").read_bytes())
    return str(out)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"use_dora": True}, "use_dora: expected a plain LoRA adapter, got one with DoRA"),
        ({"peft_type": "IA3"}, "peft_type: expected LORA, got 'IA3'"),
        (
            {"modules_to_save": ["lm_head"]},
            "modules_to_save: expected a plain LoRA adapter, got one with trained copies of whole modules",
        ),
        ({"r": 0}, "r: expected a positive number, got 0"),
    ],
    ids=["dora", "not-lora", "modules-to-save", "rank-0"],
)
def test_an_adapter_evomerge_would_fold_differently_from_peft_is_one_line(
    tiny_family, adapters, tmp_path, edits, message
):
    adapter = edited_adapter(adapters["plain"], tmp_path / "edited", **edits)
    with pytest.raises(InputError) as caught:
        load_checkpoint(f"{tiny_family['child0']}+{adapter}")
    assert str(caught.value) == f"{adapter}: {message}"


def test_an_adapter_for_another_model_shape_or_no_adapter_is_one_line(
    tiny_family, tiny_tied_family, adapters, tmp_path
):
    with pytest.raises(InputError) as caught:
        load_checkpoint(f"{tiny_family['child0']}+{tmp_path}")
    assert str(caught.value) == f"{tmp_path}: expected a PEFT adapter directory, found no adapter_config.json"
    with pytest.raises(InputError) as caught:  # a 3-layer model: layer 3's modules are missing
        load_checkpoint(f"{tiny_tied_family['child0']}+{adapters['plain']}")
    assert "which the model lacks" in str(caught.value) and "\n" not in str(caught.value)
