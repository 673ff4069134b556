"""vLLM backend: lm-eval's own VLLM model class, with each candidate's weights pushed into the live engine.

vLLM is CUDA-only and an optional extra, so nothing here imports it until the backend is used, and a config
that names it validates without it. A candidate travels as one safetensors file in a memory-backed scratch
directory (/dev/shm): either every worker loads it into its running model (`weight_update: live`, through
vLLM's worker-extension hook and `collective_rpc`), or the engine restarts from it (`reload`, slow: a
fallback for models whose `load_weights` cannot take a full state dict).
"""

import gc
import importlib.util
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from evaluators.config import EvalConfig
from merge_core.errors import InputError

if TYPE_CHECKING:
    from lm_eval.models.vllm_causallms import VLLM

INSTALL_HINT = "pip install 'evomerge[gpu]' on a CUDA machine"


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise InputError("eval config", "backend", f"'vllm' needs the vllm package; install it with {INSTALL_HINT}")


class CandidateWeightLoader:
    """Mixed into every vLLM worker (engine arg `worker_extension_cls`), so `collective_rpc` can call it."""

    def load_candidate(self, path: str) -> None:
        from safetensors.torch import load_file

        # load_weights takes checkpoint names and shards each tensor for this worker's tensor-parallel rank.
        self.model_runner.get_model().load_weights(weights=load_file(path).items())


def vllm_lm(model_dir: Path, config: EvalConfig) -> "VLLM":
    """Start a vLLM engine on `model_dir` (the base: it fixes architecture, config and tokenizer)."""
    require_vllm()
    from lm_eval.models.vllm_causallms import VLLM

    options = config.vllm
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
    if options.weight_update == "live":
        arguments["worker_extension_cls"] = f"{__name__}.CandidateWeightLoader"
    # What the user passes explicitly wins over the options above.
    return VLLM(**{**arguments, **options.engine_args, **config.model_args})


def load_candidate(lm: "VLLM", state_dict: Mapping[str, torch.Tensor], config: EvalConfig) -> None:
    """Make the engine score `state_dict` (full checkpoint names) from its next request on."""
    scratch = Path(tempfile.mkdtemp(prefix="evomerge-candidate-", dir=config.vllm.scratch_dir))
    try:
        # Cloned to CPU: safetensors refuses tensors that share storage (tied embeddings).
        weights = {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}
        save_file(weights, scratch / "model.safetensors", metadata={"format": "pt"})
        if config.vllm.weight_update == "live":
            lm.model.collective_rpc("load_candidate", args=(str(scratch / "model.safetensors"),))
        else:
            _restart_engine(lm, scratch)
        lm.model.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
    finally:
        shutil.rmtree(scratch)


def _restart_engine(lm: "VLLM", scratch: Path) -> None:
    from vllm import LLM

    base = Path(lm.model_args["model"])  # config, tokenizer and generation files come from the base
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(path, scratch)
    lm.model = None  # the old engine must release its GPU memory before the new one claims it
    gc.collect()
    torch.cuda.empty_cache()
    lm.model = LLM(**{**lm.model_args, "model": str(scratch)})
