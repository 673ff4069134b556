"""`evomerge moe` against `mergekit-moe` 0.1.5 run as a subprocess on the tiny Llama family.

Every gate mode at tolerance 0: hidden modes run the base through the same transformers forward in bfloat16 and
reduce as mergekit does; cheap_embed gathers the rows mergekit's one-hot product picks (exact: every other term
is a zero); random and uniform_random draw from a generator seeded as `--random-seed` seeds mergekit's. The
layouts differ (ours per expert under block_sparse_moe, mergekit's fused under mlp): ours is stacked into its
names to compare, and both load in transformers to the same model.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_family
from safetensors.torch import load_file, save_file
from test_session import load_dir
from transformers import AutoModelForCausalLM

from merge_core.moe import build_moe
from merge_core.moe_config import MoEConfig
from merge_core.moe_model import fused_layout as in_mergekit_layout  # mergekit 0.1.5 writes this layout
from search.cli import main

# One process for every config: mergekit's imports cost more than its tiny builds.
MERGEKIT_MOE = """
import json, sys
from mergekit.scripts.moe import main
for args in json.loads(sys.argv[1]):
    main(args, standalone_mode=False)
"""
PROMPTS = {
    "child0": "positive_prompts: [abc 12, hello world]\n    negative_prompts: [zzz]",
    "child1": "positive_prompts: ['1+1=2', '2+2=4 and more']",
    "child2": "positive_prompts: ['x: y']\n    negative_prompts: [abc, '9']",
    "base": "positive_prompts: [the end]",
}


def moe_yaml(base: str, experts: dict[str, str], head: str, prompts: bool = True) -> str:
    entries = "".join(
        f"  - source_model: {path}\n    {PROMPTS[name] if prompts else 'noise_scale: 0.01'}\n"
        for name, path in experts.items()
    )
    return f"base_model: {base}\n{head}\nexperts:\n{entries}"


def configs(f: dict, tied: dict) -> dict[str, tuple[str, int | None]]:
    """name -> (config, the seed given to both tools, None for no randomness)."""
    children = {name: f[name] for name in ("child0", "child1", "child2")}
    return {
        "hidden": (moe_yaml(f["base"], children, "gate_mode: hidden\ndtype: float32"), None),
        "hidden_avg_fp16_four": (
            moe_yaml(f["base"], {"base": f["base"], **children}, "gate_mode: hidden_avg\ndtype: float16"),
            None,
        ),
        "cheap_embed_top1": (moe_yaml(f["base"], children, "gate_mode: cheap_embed\nexperts_per_token: 1"), None),
        "random_noise_bf16": (
            moe_yaml(f["base"], children, "gate_mode: random\ndtype: bfloat16", prompts=False)
            + "    residual_scale: 0.5\n",
            7,
        ),
        "uniform_random": (moe_yaml(f["base"], children, "gate_mode: uniform_random"), 3),
        "tied_hidden_last": (
            moe_yaml(tied["base"], {"child0": tied["child0"], "child1": tied["child1"]}, "gate_mode: hidden_last"),
            None,
        ),
    }


@pytest.fixture(scope="module")
def built(tiny_family, tiny_tied_family, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (evomerge's output through the CLI, mergekit-moe's output)."""
    root = tmp_path_factory.mktemp("moe")
    runs, outputs = [], {}
    for name, (text, seed) in configs(tiny_family, tiny_tied_family).items():
        (root / f"{name}.yml").write_text(text)
        seeded = [] if seed is None else ["--random-seed", str(seed)]
        runs.append([str(root / f"{name}.yml"), str(root / f"mk_{name}"), "--quiet", *seeded])
        assert main(["moe", str(root / f"{name}.yml"), str(root / name), "--seed", str(seed or 0)]) == 0
        outputs[name] = (root / name, root / f"mk_{name}")
    result = subprocess.run([sys.executable, "-c", MERGEKIT_MOE, json.dumps(runs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return outputs


NAMES = list(configs({n: "" for n in ("base", "child0", "child1", "child2")}, {"base": "", "child0": "", "child1": ""}))


@pytest.mark.parametrize("name", NAMES)
def test_writes_what_mergekit_moe_writes(name, built):
    ours_dir, theirs_dir = built[name]
    ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
    config = json.loads((ours_dir / "config.json").read_text())
    experts, layers = config["num_local_experts"], config["num_hidden_layers"]
    # nothing but the base's non-MLP tensors, three weights per expert per layer, and a router per layer
    assert len(ours) == len(theirs) - 3 * layers + 3 * experts * layers + layers
    stacked = in_mergekit_layout(ours)
    assert sorted(stacked) == sorted(theirs)
    for tensor_name, tensor in theirs.items():
        assert stacked[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(stacked[tensor_name], tensor), tensor_name
    assert config == json.loads((theirs_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"


@pytest.mark.parametrize("name", ["hidden", "cheap_embed_top1", "random_noise_bf16"])
def test_config_and_routers_are_what_the_config_asks(name, built):
    ours_dir, _ = built[name]
    config = json.loads((ours_dir / "config.json").read_text())
    expected = {
        "hidden": (3, 2, "float32"),
        "cheap_embed_top1": (3, 1, "float32"),
        "random_noise_bf16": (3, 2, "bfloat16"),
    }
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["dtype"]) == expected[name]
    router = load_dir(ours_dir)["model.layers.1.block_sparse_moe.gate.weight"]
    assert router.shape == (3, 32)
    if name != "random_noise_bf16":  # prompt routers are unit rows per expert
        # normalised in bfloat16 for hidden (mergekit's precision there), in float32 for cheap_embed
        assert torch.allclose(router.float().norm(dim=1), torch.ones(3), atol=1e-2 if name == "hidden" else 1e-6)


def test_cheap_embed_routes_every_layer_alike(built):
    tensors = load_dir(built["cheap_embed_top1"][0])
    routers = [tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"] for layer in range(4)]
    assert all(torch.equal(router, routers[0]) for router in routers)


def test_noise_and_residual_scale_do_what_they_say(built, tiny_family):
    """Every expert of random_noise_bf16 has noise_scale 0.01; the last one also residual_scale 0.5."""
    tensors = load_dir(built["random_noise_bf16"][0])
    name = "model.layers.0.mlp.down_proj.weight"
    child0, child2 = (load_file(Path(tiny_family[c]) / "model.safetensors")[name] for c in ("child0", "child2"))
    noisy = tensors["model.layers.0.block_sparse_moe.experts.0.w2.weight"].float()
    assert 0.009 < (noisy - child0).std() < 0.011
    halved = tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"].float()
    assert 0.0045 < (halved - 0.5 * child2).std() < 0.0055


def test_tokenizer_is_the_base_one_mergekit_adds_its_prompt_padding(built, tiny_family):
    """Ours: the base's tokenizer files byte for byte. mergekit saves the tokenizer it padded its prompts with
    (left padding with <s> baked into tokenizer.json and tokenizer_config.json): evomerge keeps that out."""
    ours_dir, theirs_dir = built["hidden"]
    base = Path(tiny_family["base"])
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ours_dir / file).read_bytes() == (base / file).read_bytes(), file
    ours, theirs = (json.loads((d / "tokenizer.json").read_text()) for d in (ours_dir, theirs_dir))
    assert theirs["padding"]["pad_token"] == "<s>" and ours["padding"] is None
    assert {k: v for k, v in ours.items() if k != "padding"} == {k: v for k, v in theirs.items() if k != "padding"}
    ours, theirs = (json.loads((d / "tokenizer_config.json").read_text()) for d in (ours_dir, theirs_dir))
    differing = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
    assert differing == {"pad_token", "is_local", "local_files_only"}


def test_loads_in_transformers_as_mergekits_model_and_generates(built):
    ours_dir, theirs_dir = built["hidden"]
    ours, theirs = (AutoModelForCausalLM.from_pretrained(d) for d in (ours_dir, theirs_dir))
    assert type(ours).__name__ == "MixtralForCausalLM"
    state, expected = ours.state_dict(), theirs.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    prompt = torch.tensor([[1, 5, 6, 7]])
    generated = ours.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated.shape == (1, 10) and torch.equal(generated[:, :4], prompt)
    assert torch.equal(generated, theirs.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6))


def test_experts_all_one_model_compute_that_model(tiny_family, tmp_path):
    """base and every expert child0, one expert per token: the router's only effect is a weight of exactly 1, so
    the logits are child0's but for float32 rounding (about 5e-8 here: Mixtral's experts multiply gate_proj and
    up_proj as one fused matrix and sum the experts' outputs by index_add, not as LlamaMLP's separate products)."""
    child0 = tiny_family["child0"]
    text = (
        f"base_model: {child0}\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n"
        f"  - {{source_model: {child0}, positive_prompts: [abc]}}\n"
        f"  - {{source_model: {child0}, positive_prompts: ['123']}}\n"
    )
    out = build_moe(MoEConfig.from_yaml(text), tmp_path / "same", allow_all_same=True)
    prompt = torch.tensor([[1, 5, 6, 7, 8, 9]])
    moe, dense = (AutoModelForCausalLM.from_pretrained(d) for d in (out, child0))
    with torch.no_grad():
        assert torch.allclose(moe(prompt).logits, dense(prompt).logits, rtol=0, atol=1e-6)


def test_keys_mergekit_ignores_are_warned_about_and_kept(tiny_family, caplog):
    head = "gate_mode: random\nexperts_per_token: 1\nname: my-moe"
    text = moe_yaml(tiny_family["base"], {"child0": tiny_family["child0"]}, head, prompts=False)
    config = MoEConfig.from_yaml(text.replace("    noise_scale", "    rank: 3\n    noise_scale"))
    assert [record.getMessage() for record in caplog.records] == [
        "<text>: name: ignored (not a mergekit-moe key; mergekit-moe ignores it too)",
        "<text>: experts[0].rank: ignored (not a mergekit-moe key; mergekit-moe ignores it too)",
    ]
    assert config.model_extra == {"name": "my-moe"} and config.experts[0].noise_scale == 0.01


@pytest.fixture(scope="module")
def odd_models(tiny_family, tmp_path_factory) -> dict[str, str]:
    """child0 relabelled Mistral, relabelled GPT-2, with a cut MLP; the base without its tokenizer; a Llama of
    another width."""
    root = tmp_path_factory.mktemp("odd_moe")
    odd = {}
    for name, change in (("mistral", "mistral"), ("gpt2", "gpt2"), ("cut", None)):
        target = root / name
        shutil.copytree(tiny_family["child0"], target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config | {"model_type": change or config["model_type"]}))
        odd[name] = str(target)
    tensors = load_file(root / "cut" / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"][:32].clone()
    save_file(tensors, root / "cut" / "model.safetensors", metadata={"format": "pt"})
    odd["untokenized"] = str(root / "untokenized")
    shutil.copytree(tiny_family["base"], odd["untokenized"], ignore=shutil.ignore_patterns("tokenizer*"))
    odd["wide"] = make_tiny_family(root / "wide", tie_embeddings=False, children=0, hidden=48)["base"]
    return odd


def bad_configs(f: dict, odd: dict) -> dict[str, tuple[str, str]]:
    """name -> (config, the one line's field and expectation, after the file name)."""
    b, c0, c1 = f["base"], f["child0"], f["child1"]

    def two(first: str = c0, second: str = c1, head: str = "gate_mode: hidden") -> str:
        return moe_yaml(b, {"child0": first, "child1": second}, head)

    return {
        "yaml_syntax": ("experts: [\n", "line 2: invalid YAML"),
        "unknown_gate_mode": (two(head="gate_mode: router"), "gate_mode: expected one of 'hidden', 'hidden_avg',"),
        "missing_expert": (two(second=f"{b}/nowhere"), f"experts[1].source_model: {b}/nowhere: no such model directory"),
        "other_architecture": (two(first=odd["mistral"]), "experts[0].source_model: expected the base_model's architecture llama, got mistral"),
        "not_llama": (two(second=odd["gpt2"]), "experts[1].source_model: expected a Llama or Mistral model (Mixtral's experts), got gpt2"),
        "cut_mlp": (two(second=odd["cut"]), "experts[1].source_model: model.layers.2.mlp.up_proj.weight has shape (32, 32), the base_model's (64, 32)"),
        "other_width": (two(first=odd["wide"]), "experts[0].source_model: model.layers.0.mlp.gate_proj.weight has shape (64, 48)"),
        "no_prompts": (two().replace("    positive_prompts: ['1+1=2', '2+2=4 and more']\n", ""), "experts[1].positive_prompts: expected at least one prompt"),
        "same_prompts": (
            f"base_model: {b}\ngate_mode: cheap_embed\nexperts:\n  - {{source_model: {c0}, positive_prompts: [abc]}}\n"
            f"  - {{source_model: {c1}, positive_prompts: [abc]}}\n",
            "experts: every expert has the same prompts",
        ),
        "all_same_model": (two(second=c0), "experts: every expert is the same model, which only costs more than that model; --i-understand-this-is-not-useful-without-training"),
        "too_few_experts": (two(head="experts_per_token: 3"), "experts_per_token: expected at most 2 (the experts), got 3"),
        "shared_experts": (two(head=f"shared_experts: [{{source_model: {c1}}}]"), "shared_experts: not supported"),
        "qwen_output": (two(head="architecture: qwen"), "architecture: expected mixtral"),
        "lora_base_hidden": (two().replace(f"base_model: {b}", f"base_model: {b}+{c1}"), "base_model: gate_mode hidden runs the base model: give a model, not MODEL+ADAPTER"),
        "no_tokenizer": (
            two().replace(f"base_model: {b}", f"base_model: {odd['untokenized']}"),
            "base_model: gate_mode hidden tokenizes the prompts: no tokenizer",
        ),
        "merge_recipe": (f"merge_method: linear\nmodels: [{{model: {b}}}]\n", "merge_method: this is a mergekit-yaml recipe: merge it with `evomerge merge`"),
    }  # fmt: skip


BAD = list(
    bad_configs(
        {n: "" for n in ("base", "child0", "child1")},
        {n: "" for n in ("mistral", "gpt2", "cut", "untokenized", "wide")},
    )
)


@pytest.mark.parametrize("case", BAD)
def test_bad_config_is_one_line_and_exit_2(case, tiny_family, odd_models, tmp_path, capsys):
    text, expected = bad_configs(tiny_family, odd_models)[case]
    config = tmp_path / "moe.yml"
    config.write_text(text)
    code = main(["moe", str(config), str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"evomerge: error: {config}: {expected}"), lines[0]
    assert [path.name for path in tmp_path.iterdir()] == ["moe.yml"]


def test_merge_given_a_moe_config_names_the_moe_command(tiny_family, tmp_path, capsys):
    config = tmp_path / "moe.yml"
    config.write_text(configs(tiny_family, tiny_family)["hidden"][0])
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"evomerge: error: {config}: experts: this is a mergekit-moe config (Mixture of Experts): "
        "build it with `evomerge moe`\n"
    )
