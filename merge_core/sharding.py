"""Tensor-parallel shards of a checkpoint, laid out as vLLM's tensor parallelism lays out a Llama.

Rank r of W holds, of each weight:
    output rows r    q/k/v, gate/up projections (ColumnParallelLinear), embeddings and lm_head (vocab-parallel)
    input columns r  o_proj and down_proj (RowParallelLinear)
    all of it        norms and every other tensor (replicated)
each split into W contiguous parts of ceil(n / W) (the last one shorter). A session over shards
(MergeSession(..., shard=Shard(r, W))) loads only its part of every source from the safetensors files, and
merges it where it lives: for an elementwise method (MergeMethod.elementwise) the merge of the shards is the
shard of the merge, bit for bit, so a candidate is never gathered on one device. A method that looks at a
whole tensor (a top-k, an angle, a norm, one RNG stream drawn in tensor order) is refused for shards.
"""

from dataclasses import dataclass

import torch

from merge_core.architecture import text_config
from merge_core.errors import InputError

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Shard: expected 0 <= rank < world, got rank {self.rank} of {self.world}")

    @classmethod
    def of_process_group(cls) -> "Shard":
        """This process's shard in the default torch.distributed group (gloo on CPU, NCCL on GPU)."""
        import torch.distributed as dist

        return cls(dist.get_rank(), dist.get_world_size())

    def dim(self, name: str) -> int | None:
        """The dimension `name` is split along, or None when every rank holds all of it."""
        module, _, kind = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        if leaf in COLUMN_PARALLEL:
            return 0  # weights and biases: output rows
        if leaf in ROW_PARALLEL and kind == "weight":
            return 1  # a row-parallel bias is added once, after the reduction: replicated
        return None

    def bounds(self, size: int) -> tuple[int, int]:
        chunk = -(-size // self.world)
        return min(size, self.rank * chunk), min(size, (self.rank + 1) * chunk)

    def index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        """The slice of a tensor of `shape` this rank holds; None for all of it."""
        dim = self.dim(name)
        if dim is None or dim >= len(shape):
            return None
        start, stop = self.bounds(shape[dim])
        return (slice(None),) * dim + (slice(start, stop),)

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        index = self.index(name, tuple(tensor.shape))
        return tensor if index is None else tensor[index].contiguous()


def check_heads(config: dict, shard: Shard, where: str) -> None:
    """Attention projections split by heads: every rank must get whole heads, as vLLM requires."""
    text = text_config(config)
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = text.get(key)
        if heads is not None and heads % shard.world:
            raise InputError(where, key, f"expected a count the {shard.world} shards divide, got {heads}")


def check_shardable(method_name: str, elementwise: bool, where: str) -> None:
    if not elementwise:
        raise InputError(
            where,
            "merge_method",
            f"{method_name} cannot merge shards: it looks at whole tensors (a top-k, an angle, a norm or one RNG "
            "stream in tensor order); elementwise methods can: linear, task_arithmetic, passthrough",
        )
