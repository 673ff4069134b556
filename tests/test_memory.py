"""The memory plan: what a worker keeps resident, from headers alone, against a real session and by hand for
7B and 70B shapes (checkpoints whose safetensors headers describe those models, in sparse files)."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml

from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from merge_core.memory import session_bytes
from merge_core.methods import METHODS
from merge_core.sources import read_info
from search.config import SearchConfig
from search.execution.memory import check_memory, plan_memory
from search.execution.preflight import preflight

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000}
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "vocab_size": 32000}
HEADS = {LLAMA_7B["hidden_size"]: (32, 32), LLAMA_70B["hidden_size"]: (64, 8)}  # attention, key-value heads


def llama_shapes(size: dict) -> dict[str, list[int]]:
    hidden, inter, vocab = size["hidden_size"], size["intermediate_size"], size["vocab_size"]
    heads, kv_heads = HEADS[hidden]
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(size["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.self_attn.{p}_proj.weight": [hidden, hidden] for p in ("q", "o")}
        shapes |= {f"{layer}.self_attn.{p}_proj.weight": [kv, hidden] for p in ("k", "v")}
        shapes |= {f"{layer}.mlp.{p}_proj.weight": [inter, hidden] for p in ("gate", "up")}
        shapes[f"{layer}.mlp.down_proj.weight"] = [hidden, inter]
        shapes |= {f"{layer}.{norm}.weight": [hidden] for norm in ("input_layernorm", "post_attention_layernorm")}
    return shapes | {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}


def numel(shapes: dict[str, list[int]]) -> int:
    return sum(torch.Size(shape).numel() for shape in shapes.values())


def header_only_family(root: Path, size: dict, fine_tunes: int = 3) -> list[Path]:
    """A base and fine-tunes whose model.safetensors is a real header over a sparse (unwritten) data section,
    one file hard-linked into every model directory: no disk is used for the weights."""
    shapes = llama_shapes(size)
    header, offset = {}, 0
    for name, shape in shapes.items():
        end = offset + torch.Size(shape).numel() * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = root / "model.safetensors"
    with weights.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        file.truncate(8 + len(text) + offset)
    assert weights.stat().st_blocks * 512 < 10**8  # sparse: the weights are never written
    heads, kv_heads = HEADS[size["hidden_size"]]
    config = {**size, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "model_type": "llama"}
    config |= {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    models = []
    for name in ["base", *(f"ft{i}" for i in range(fine_tunes))]:
        directory = root / name
        directory.mkdir()
        os.link(weights, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config))
        models.append(directory)
    return models


def search_config(tmp_path: Path, models: list[Path], method: str, **sections) -> SearchConfig:
    data = {
        "models": {"base": str(models[0]), "fine_tunes": [str(m) for m in models[1:]]},
        "merge": {"method": method},
        "objectives": [{"task": "toy_search", "metric": "acc"}],
        "execution": {"device": "cuda", "device_memory": "80GB"},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(data))
    return SearchConfig.from_yaml(path)


@pytest.mark.parametrize(("method", "dtype"), [("ties", "float64"), ("dare_ties", None), ("linear", "bfloat16")])
def test_the_plan_equals_what_a_real_session_keeps(toy_family, method, dtype):
    models = [str(toy_family.base), *map(str, toy_family.children.values())]
    recipe = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models[1:]]}
    recipe |= {"dtype": dtype} if dtype else {}
    recipe |= {"base_model": models[0]} if method != "linear" else {}
    if method != "linear":
        for entry in recipe["models"]:
            entry["parameters"]["density"] = 0.5
    session = MergeSession(models)
    session.materialize(Recipe.from_dict(recipe))  # every tensor once: its casts and prepared state are kept
    held = {
        "sources": sum(t.nbytes for c in session.checkpoints.values() for t in c.tensors.values()),
        "casts": sum(t.nbytes for t in session._casts.values()),
        "prepared": sum(
            t.nbytes for state in session._prepared.values() for value in state.values() for t in _tensors(value)
        ),
    }
    planned = session_bytes(
        [read_info(m) for m in models],
        METHODS[method],
        getattr(torch, dtype) if dtype else None,
        models[0],  # loaded by a search's worker even for linear, which merges only the fine-tunes
    )
    assert (planned.sources, planned.casts, planned.prepared) == tuple(held.values())
    assert held["prepared"] > 0 if method != "linear" else held["prepared"] == 0
    assert held["casts"] > 0 if dtype else held["casts"] == 0


@pytest.mark.parametrize(
    ("method", "dtype"), [("ties", "float64"), ("dare_ties", "bfloat16"), ("della", None), ("breadcrumbs_ties", None)]
)
def test_a_lean_session_merges_bit_for_bit_what_a_fast_one_does_and_keeps_only_the_sources(toy_family, method, dtype):
    models = [str(toy_family.base), *map(str, toy_family.children.values())]
    parameters = {"weight": 0.7, "density": 0.6} | ({"epsilon": 0.1} if method == "della" else {})
    recipe = {"merge_method": method, "base_model": models[0], "dtype": dtype}
    recipe["models"] = [{"model": m, "parameters": parameters} for m in models[1:]]
    recipe = Recipe.from_dict({k: v for k, v in recipe.items() if v is not None})
    fast, lean = MergeSession(models), MergeSession(models, lean=True)
    for seed in (0, 1):  # the second candidate of a fast session uses its kept state
        ours, reference = lean.materialize(recipe, seed=seed), fast.materialize(recipe, seed=seed)
        assert sorted(ours) == sorted(reference)
        assert all(torch.equal(ours[name], reference[name]) for name in reference)
    assert fast._prepared and not lean._prepared and not lean._casts


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value or [] for t in _tensors(item)] if isinstance(value, list) else []


def test_a_7b_ties_search_does_not_fit_one_80gb_gpu_and_says_why(tmp_path):
    models = header_only_family(tmp_path, LLAMA_7B)
    count = numel(llama_shapes(LLAMA_7B))
    assert count == 6_738_415_616  # Llama-2-7B's parameter count
    # A cluster's GPU worker (this machine has no GPU for the local device check to find)
    cluster = {"ray_address": "head-node:6379"}
    config = search_config(tmp_path, models, "ties", execution=cluster, merge={"memory": "fast"})
    plan = plan_memory(config, [read_info(str(m)) for m in models])
    # bf16 sources; TIES keeps each fine-tune's bf16 task vector and its int32 magnitude ranks: 6 bytes each
    assert plan.terms == {"sources": 4 * count * 2, "task vectors and ranks": 3 * count * 6, "live model": count * 2}
    assert (plan.device, plan.sharing, plan.available) == ("cuda:0", 1, 80 * 10**9)
    message = (
        r"search\.yml: merge\.memory: expected the run to fit in the 80\.0 GB of cuda:0, got 188\.7 GB; the "
        r"biggest term is task vectors and ranks, 121\.3 GB: ties keeps every fine-tune's task vector .* "
        r"merge\.memory: lean \(or auto\) recomputes them"
    )
    with pytest.raises(InputError, match=message):
        preflight(config)  # refused before the tasks are even looked up, let alone Ray or a run dir
    assert not (tmp_path / "run").exists()

    # merge.memory auto (the default) goes lean: the sources, one tensor's working set, the live model
    auto = plan_memory(search_config(tmp_path, models, "ties", execution=cluster), [read_info(str(m)) for m in models])
    embedding = 32000 * 4096  # the largest tensors: embed_tokens and lm_head
    assert auto.lean and auto.terms == {
        "sources": 4 * count * 2,
        "one tensor's working set": 3 * embedding * 6,
        "live model": count * 2,
    }
    check_memory(config, auto)  # 69.7 GB of 80
    assert auto.lines()[0].startswith("memory        cuda:0, merge.memory lean (sources only;")


def test_a_7b_linear_search_fits_and_plan_says_how_much_is_left(tmp_path):
    models = header_only_family(tmp_path, LLAMA_7B)
    count = numel(llama_shapes(LLAMA_7B))
    config = search_config(tmp_path, models, "linear", evaluation={"batch_size": 8})
    plan = plan_memory(config, [read_info(str(m)) for m in models])
    assert plan.terms == {"sources": 4 * count * 2, "live model": count * 2}
    check_memory(config, plan)  # 67.4 GB of 80: fits
    memory, workspace, warning = plan.lines()
    assert warning.startswith("warning       a batch padded to 4096 tokens would not fit: if scoring runs out")
    assert memory == (
        "memory        cuda:0, merge.memory fast: sources 53.9 GB + live model 13.5 GB = 67.4 GB per worker; 67.4 GB resident of 80.0 GB"
    )
    # per token: bf16 logits + their float32 log-probs, keys and values of 32 layers, the MLP's in and out
    per_token = 32000 * (2 + 4) + 32 * 2 * 4096 * 2 + 2 * 11008 * 2
    assert plan.workspace.bytes == 8 * 4096 * per_token
    assert workspace.startswith(f"workspace     scoring: up to {8 * 4096 * per_token / 1e9:.1f} GB more per worker")
    one = search_config(tmp_path, models, "linear", evaluation={"batch_size": 1})
    assert len(plan_memory(one, [read_info(str(m)) for m in models]).lines()) == 2  # 0.8 GB more fits: no warning


def test_two_workers_sharing_a_gpu_are_told_how_many_fit(tmp_path):
    models = header_only_family(tmp_path, LLAMA_7B)
    config = search_config(
        tmp_path, models, "linear", execution={"workers": 2, "gpus_per_worker": 0.5, "device_memory": "100GB"}
    )
    plan = plan_memory(config, [read_info(str(m)) for m in models])
    assert plan.sharing == 2
    with pytest.raises(InputError, match=r"execution\.gpus_per_worker: .* 2 workers on cuda:0 each hold their own"):
        check_memory(config, plan)


def test_a_70b_family_is_planned_from_its_headers(tmp_path):
    models = header_only_family(tmp_path, LLAMA_70B, fine_tunes=2)
    count = numel(llama_shapes(LLAMA_70B))
    assert count == 68_976_648_192  # Llama-2-70B's parameter count
    config = search_config(tmp_path, models, "task_arithmetic", merge={"dtype": "float32", "memory": "fast"})
    plan = plan_memory(config, [read_info(str(m)) for m in models])
    assert plan.terms == {
        "sources": 3 * count * 2,
        "merge-dtype casts": 3 * count * 4,  # every bf16 source again in float32
        "task vectors and ranks": 2 * count * 4,  # float32 task vectors; task arithmetic ranks nothing
        "live model": count * 2,
    }
    with pytest.raises(InputError, match=r"merge\.memory: .* the biggest term is merge-dtype casts, 827\.7 GB"):
        check_memory(config, plan)
    # Lean keeps only the sources, and those alone are 413.9 GB: no session mode makes a 70B family fit one GPU.
    lean = search_config(tmp_path, models, "task_arithmetic", merge={"dtype": "float32"})
    with pytest.raises(InputError, match=r"models\.fine_tunes: .* the biggest term is sources, 413\.9 GB"):
        check_memory(lean, plan_memory(lean, [read_info(str(m)) for m in models]))


def test_device_memory_takes_sizes_with_units(tmp_path):
    models = header_only_family(tmp_path, LLAMA_7B, fine_tunes=1)
    for given, expected in [("141GiB", 141 * 2**30), ("80 GB", 80 * 10**9), (2**30, 2**30)]:
        config = search_config(tmp_path, models, "linear", execution={"device_memory": given})
        assert config.execution.device_memory == expected
    with pytest.raises(InputError, match=r"execution\.device_memory: expected bytes or a size like '80GB'"):
        search_config(tmp_path, models, "linear", execution={"device_memory": "lots"})


def test_a_vllm_engine_shares_the_gpu_with_the_sources_and_is_told_what_to_lower(tmp_path):
    models = header_only_family(tmp_path, LLAMA_7B)
    count = numel(llama_shapes(LLAMA_7B))
    infos = [read_info(str(m)) for m in models]
    vllm = {"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.8}}
    config = search_config(tmp_path, models, "linear", evaluation=vllm)
    plan = plan_memory(config, infos)
    # The engine claims its share of the GPU (weights, KV cache, activations) in place of the live model.
    assert plan.terms == {"sources": 4 * count * 2, "vLLM engine": 64 * 10**9}
    with pytest.raises(InputError) as caught:
        check_memory(config, plan)
    assert str(caught.value) == f"{tmp_path / 'search.yml'}: " + (
        "evaluation.vllm.gpu_memory_utilization: expected the run to fit in the 80.0 GB of cuda:0, got "
        "117.9 GB; the biggest term is vLLM engine, 64.0 GB: vLLM claims 0.8 of the GPU and the merge sources share "
        "it: lower it to what the engine's weights and KV cache need"
    )
    lower = search_config(tmp_path, models, "linear", evaluation={**vllm, "vllm": {"gpu_memory_utilization": 0.3}})
    check_memory(lower, plan_memory(lower, infos))  # 53.9 GB of sources + 24 GB for the engine: fits
    # On CPU: the engine's weights plus the KV cache it was given.
    cpu = search_config(
        tmp_path,
        models,
        "linear",
        evaluation={"backend": "vllm", "vllm": {"kv_cache_memory": "2GiB"}},
        execution={"device": "cpu", "device_memory": "200GB"},
    )
    assert plan_memory(cpu, infos).terms == {"sources": 4 * count * 2, "live model": count * 2, "KV cache": 2 * 2**30}
