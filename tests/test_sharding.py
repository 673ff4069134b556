"""Tensor-parallel shards: two gloo ranks each load and merge only their part of every tensor, and the parts
are the unsharded merge's, bit for bit, for the elementwise methods; the others are refused in one line."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from merge_core.methods import METHODS
from merge_core.sharding import Shard

WORLD = 2


def recipes(toy_family) -> dict[str, str]:
    base, children = str(toy_family.base), [str(c) for c in toy_family.children.values()]
    weighted = [{"model": c, "parameters": {"weight": w}} for c, w in zip(children, (0.7, 0.2, 0.45), strict=True)]
    return {
        "linear": yaml.safe_dump({"merge_method": "linear", "models": weighted}),
        "task_arithmetic": yaml.safe_dump(
            {"merge_method": "task_arithmetic", "base_model": base, "models": weighted, "dtype": "bfloat16"}
        ),
        "passthrough": yaml.safe_dump(
            {"merge_method": "passthrough", "models": [{"model": children[0], "parameters": {"scale": 0.5}}]}
        ),
    }


def merge_on_rank(rank: int, port: int, models: list[str], texts: dict[str, str], out: str) -> None:
    """One rank: its shard of every source, each recipe merged into its own part (what a tensor-parallel
    engine's worker keeps); written out here only so the test can compare."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        session = MergeSession(models, shard=Shard.of_process_group())
        for name, text in texts.items():
            save_file(session.materialize(Recipe.from_yaml(text)), Path(out) / f"{name}-rank{rank}.safetensors")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_ranks_merge_their_shards_to_the_unsharded_merge_bit_for_bit(toy_family, tmp_path):
    models = [str(toy_family.base), *map(str, toy_family.children.values())]
    texts = recipes(toy_family)
    mp.spawn(merge_on_rank, args=(free_port(), models, texts, str(tmp_path)), nprocs=WORLD, join=True)
    whole = MergeSession(models)
    layout = Shard(0, WORLD)
    for name, text in texts.items():
        assert METHODS[name].elementwise
        expected = whole.materialize(Recipe.from_yaml(text))
        parts = [load_file(tmp_path / f"{name}-rank{rank}.safetensors") for rank in range(WORLD)]
        split = 0
        for tensor, full in expected.items():
            dim = layout.dim(tensor)
            if dim is None:
                assert all(torch.equal(part[tensor], full) for part in parts), tensor
                continue
            split += 1
            assert all(part[tensor].shape[dim] < full.shape[dim] for part in parts), tensor  # never whole
            assert torch.equal(torch.cat([part[tensor] for part in parts], dim=dim), full), (name, tensor)
        assert split >= 7 * 2  # q, k, v, o, gate, up, down of both layers at least


def test_methods_that_look_at_whole_tensors_and_heads_that_do_not_divide_are_one_line(toy_family):
    models = [str(toy_family.base), *map(str, toy_family.children.values())]
    session = MergeSession(models, shard=Shard(1, WORLD))
    ties = Recipe.from_dict(
        {"merge_method": "ties", "base_model": models[0], "models": [{"model": models[1], "parameters": {"weight": 1}}]}
    )
    with pytest.raises(InputError, match=r"merge_method: ties cannot merge shards: it looks at whole tensors"):
        session.plan(ties)
    assert not any(METHODS[name].elementwise for name in ("ties", "dare_ties", "slerp", "della", "model_stock"))
    with pytest.raises(InputError, match=r"num_attention_heads: expected a count the 3 shards divide, got 2"):
        MergeSession(models, shard=Shard(0, 3))
