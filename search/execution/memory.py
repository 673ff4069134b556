"""Will the run fit? What each worker keeps resident, how many workers share a device, against what it has.

From safetensors headers and config.json only (merge_core.memory, evaluators.memory), so a 70B family is
planned without loading it. Per worker, resident for the whole run:
    sources, casts, prepared    its MergeSession (merge_core/memory.py)
    live model                  the model candidates are written into, in the evaluation dtype
    live MoE                    genome.kind moe: the Mixtral its candidates are built as (an upper bound)
With the vLLM backend the sources live in the engine's worker, beside the engine: on a GPU the engine claims
gpu_memory_utilization of it (its weights, KV cache and activations) in place of the live model; on CPU its
weights plus evaluation.vllm.kv_cache_memory. Plus, while it scores, the evaluation workspace (an upper bound: a warning, never a refusal). Each worker
loads its own sources, so workers sharing a device (several on one host, or fractional GPUs) multiply it.
"""

import os
from collections import Counter
from dataclasses import dataclass

import torch

from evaluators.memory import Workspace, workspace
from merge_core.errors import InputError
from merge_core.memory import session_bytes, tensor_bytes
from merge_core.recipe import DTYPES
from merge_core.sources import CheckpointInfo
from search.config import MergeConfig, SearchConfig


@dataclass(frozen=True)
class MemoryPlan:
    lean: bool  # the session mode merge.memory resolves to (auto: fast where it fits)
    device: str  # where a worker's weights live: "cpu" (the host's memory) or "cuda:N"
    sharing: int  # workers holding their own copy on one such device
    terms: dict[str, int]  # per worker, resident for the run: term -> bytes
    workspace: Workspace
    available: int | None  # bytes the device has; None: unknown (a cluster's, when the config does not say)

    @property
    def per_worker(self) -> int:
        return sum(self.terms.values())

    @property
    def resident(self) -> int:
        return self.sharing * self.per_worker

    def lines(self) -> list[str]:
        """`evomerge plan`'s memory lines."""
        terms = " + ".join(f"{name} {gb(size)}" for name, size in self.terms.items())
        has = "unknown (set execution.device_memory)" if self.available is None else gb(self.available)
        shared = f" × {self.sharing} workers" if self.sharing > 1 else ""
        mode = "lean (sources only; casts and task vectors per tensor per candidate)" if self.lean else "fast"
        lines = [
            f"memory        {self.device}, merge.memory {mode}: {terms} = {gb(self.per_worker)} per worker{shared}; "
            f"{gb(self.resident)} resident of {has}",
            f"workspace     scoring: up to {gb(self.workspace.bytes)} more per worker (batch {self.workspace.batch} "
            f"× {self.workspace.tokens} tokens, logits, KV cache and the widest activation: an upper bound)",
        ]
        peak = self.resident + self.sharing * self.workspace.bytes
        if self.available is not None and self.resident <= self.available < peak:
            lines.append(
                f"warning       a batch padded to {self.workspace.tokens} tokens would not fit: if scoring runs out "
                "of memory, lower evaluation.batch_size or model_args.max_length"
            )
        return lines


def gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def plan_memory(config: SearchConfig, infos: list[CheckpointInfo]) -> MemoryPlan:
    # genome.kind moe has no merge section: its session only scores the parents, one-model linear merges
    merge = config.merge or MergeConfig(method="linear")
    method = merge.spec
    merge_dtype = DTYPES.get(merge.dtype) if merge.dtype else None
    session = session_bytes(infos, method, merge_dtype, config.models.base)
    skeleton = infos[0]  # the base: the live model's architecture
    eval_dtype = DTYPES.get(config.evaluation.dtype)  # None for 'auto': the checkpoint's own
    live = tensor_bytes(skeleton, eval_dtype)
    fast = {"sources": session.sources, "merge-dtype casts": session.casts, "task vectors and ranks": session.prepared}
    device = worker_device(config)
    shared, has = sharing(config, device), available(config, device)
    engine = {"live model": live}
    options = config.evaluation.vllm
    if config.evaluation.backend == "vllm" and device != "cpu" and has is not None:
        engine = {"vLLM engine": int(options.gpu_memory_utilization * has)}
    elif config.evaluation.backend == "vllm" and options.kv_cache_memory is not None:
        engine |= {"KV cache": options.kv_cache_memory}
    # ps+dfs keeps its stage-1 merge resident beside the sources: one more model; moe its live Mixtral
    built = {"stage-1 merge": tensor_bytes(skeleton, merge_dtype)} if config.genome.kind == "ps+dfs" else {}
    built |= moe_term(config, skeleton)
    fast = {name: size for name, size in fast.items() if size} | built | engine
    lean = {"sources": session.sources, "one tensor's working set": session.largest_tensor, **built, **engine}
    itemsize = (eval_dtype or Counter(skeleton.dtypes.values()).most_common(1)[0][0]).itemsize
    max_length = config.evaluation.model_args.get("max_length")
    scoring = workspace(skeleton.config, config.evaluation.batch_size, max_length, itemsize)
    mode = merge.memory
    if mode == "auto":  # lean only where it is needed: it recomputes per candidate what fast keeps
        mode = "lean" if has is not None and shared * sum(fast.values()) > has and session.largest_tensor else "fast"
    terms = lean if mode == "lean" else fast
    return MemoryPlan(mode == "lean", device, shared, terms, scoring, has)


def moe_term(config: SearchConfig, skeleton: CheckpointInfo) -> dict[str, int]:
    """genome.kind moe's live Mixtral, bounded above by a whole base-sized model per expert (each expert adds
    only its MLPs) in the mergekit-moe config's dtype."""
    if config.genome.kind != "moe":
        return {}
    moe = config.genome.moe.moe
    return {"live MoE": len(moe.experts) * tensor_bytes(skeleton, DTYPES.get(moe.dtype) if moe.dtype else None)}


def worker_device(config: SearchConfig) -> str:
    """The device a worker's weights will live on, as the worker resolves 'auto'."""
    execution = config.execution
    if execution.device != "auto":
        return execution.device if execution.device != "cuda" else "cuda:0"
    local = execution.ray_address == "local"
    gpu = torch.cuda.is_available() if local else execution.gpus_per_worker > 0
    return "cuda:0" if gpu else "cpu"


def sharing(config: SearchConfig, device: str) -> int:
    """Workers that hold their own copy on one device: every local CPU worker shares the host; fractional GPUs
    share a GPU. On a cluster each CPU worker is counted alone (Ray spreads them over nodes)."""
    execution = config.execution
    if device == "cpu":
        return execution.workers if execution.ray_address == "local" else 1
    fraction = execution.gpus_per_worker
    return min(execution.workers, int(1 / fraction)) if 0 < fraction < 1 else 1


def available(config: SearchConfig, device: str) -> int | None:
    if config.execution.device_memory is not None:
        return int(config.execution.device_memory)
    if config.execution.ray_address != "local":
        return None  # another machine's
    if device == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def check_memory(config: SearchConfig, plan: MemoryPlan) -> None:
    """Refuse a run whose resident weights exceed the device, naming the biggest term and what would fit."""
    if plan.available is None or plan.resident <= plan.available:
        return
    has, device = gb(plan.available), plan.device
    if plan.sharing > 1 and plan.per_worker <= plan.available:
        fit = plan.available // plan.per_worker
        field = "execution.workers" if device == "cpu" else "execution.gpus_per_worker"
        advice = f"{plan.sharing} workers on {device} each hold their own {gb(plan.per_worker)}: at most {fit} fit"
    else:
        term, size = max(plan.terms.items(), key=lambda item: item[1])
        field, advice = ADVICE[term](config)
        advice = f"the biggest term is {term}, {gb(size)}: {advice}"
    raise InputError(
        config.where, field, f"expected the run to fit in the {has} of {device}, got {gb(plan.resident)}; {advice}"
    )


ADVICE = {
    "sources": lambda c: (
        "models.fine_tunes",
        f"the {1 + len(c.models.fine_tunes)} models' weights alone: fewer fine-tunes, or a device with more memory",
    ),
    "merge-dtype casts": lambda c: (
        "merge.memory",
        f"every source is copied to {c.merge.dtype}: merge.memory: lean (or auto) casts per tensor instead",
    ),
    "task vectors and ranks": lambda c: (
        "merge.memory",
        f"{c.merge.method} keeps every fine-tune's task vector (and magnitude ranks) resident: merge.memory: lean "
        "(or auto) recomputes them per tensor per candidate, the same merge bit for bit",
    ),
    "one tensor's working set": lambda c: (
        "merge.method",
        f"{c.merge.method}'s task vectors of the largest tensor alone: fewer fine-tunes, or a device with more memory",
    ),
    "stage-1 merge": lambda c: (
        "genome.kind",
        "ps+dfs keeps its stage-1 merge resident beside the sources: genome.kind dfs searches paths over the "
        "sources alone",
    ),
    "live MoE": lambda c: (
        "genome.moe.config",
        "the candidate MoE of every expert: fewer experts, or a device with more memory",
    ),
    "live model": lambda c: (
        "evaluation.dtype",
        f"the live model in {c.evaluation.dtype}: evaluate in the sources' own dtype (evaluation.dtype: auto)",
    ),
    "vLLM engine": lambda c: (
        "evaluation.vllm.gpu_memory_utilization",
        f"vLLM claims {c.evaluation.vllm.gpu_memory_utilization:g} of the GPU and the merge sources share it: "
        "lower it to what the engine's weights and KV cache need",
    ),
    "KV cache": lambda c: (
        "evaluation.vllm.kv_cache_memory",
        "a smaller KV cache (it holds batch × max length tokens)",
    ),
}
