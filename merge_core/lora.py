"""LoRA references (`model+adapter`, mergekit's syntax): a PEFT LoRA adapter folded into its model's weights
before the merge reads them, as PEFT's merge_and_unload folds it (what mergekit runs).

Each adapted linear layer gets W + (B @ A) * scaling, scaling = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). Half-precision adapters are folded in float32, as PEFT does on CPU, and the sum is cast back to
the weight's dtype. Adapters PEFT would fold differently (DoRA, per-module rank or alpha patterns, embedding
LoRA, trained copies of whole modules, LoRA biases) are refused, by name, rather than merged approximately.
"""

import json
import math
from dataclasses import dataclass

import torch

from merge_core.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module>.lora_A.weight
LORA_KEYS = (".lora_A.weight", ".lora_B.weight")


def split_lora(ref: str) -> tuple[str, str | None]:
    """'model+adapter' -> (model, adapter); a plain reference -> (ref, None)."""
    model, plus, adapter = ref.partition("+")
    return (model, adapter) if plus else (ref, None)


@dataclass(frozen=True)
class Adapter:
    ref: str
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name, as in the model -> (A: r x in, B: out x r)


def read_adapter(ref: str) -> Adapter:
    """A PEFT LoRA adapter directory (or hub id): its config and its A / B matrices by module."""
    from merge_core.sources import read_tensors, resolve_model_dir  # sources folds adapters: import it late

    path = resolve_model_dir(ref)
    if not (path / ADAPTER_CONFIG).exists():
        raise InputError(ref, None, f"expected a PEFT adapter directory, found no {ADAPTER_CONFIG}")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    _check_config(ref, config)
    weights = path / ADAPTER_SAFETENSORS
    if not weights.exists():
        weights = path / ADAPTER_BIN
        if not weights.exists():
            raise InputError(ref, None, f"no adapter weights (expected {ADAPTER_SAFETENSORS} or {ADAPTER_BIN})")
    tensors = read_tensors(weights, "cpu")
    pairs = {}
    for key in tensors:
        stem = key.removeprefix(PREFIX)
        if not key.startswith(PREFIX) or not stem.endswith(LORA_KEYS):
            raise InputError(weights, key, "expected only LoRA A / B matrices of linear layers (lora_A / lora_B)")
        module = stem.rsplit(".", 2)[0]
        a, b = (tensors.get(f"{PREFIX}{module}{suffix}") for suffix in LORA_KEYS)
        if a is None or b is None or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise InputError(weights, key, "expected a matching lora_A (r x in) and lora_B (out x r) pair")
        pairs[module] = (a, b)
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Adapter(ref, scaling, pairs)


def _check_config(ref: str, config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise InputError(ref, "peft_type", f"expected LORA, got {config.get('peft_type')!r}")
    for key, meaning in [
        ("use_dora", "DoRA"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("lora_bias", "LoRA biases"),
        ("modules_to_save", "trained copies of whole modules"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ]:
        if config.get(key):
            raise InputError(ref, key, f"expected a plain LoRA adapter, got one with {meaning}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise InputError(ref, key, f"expected a positive number, got {value!r}")


def fold(tensors: dict[str, torch.Tensor], adapter: Adapter, where: str) -> dict[str, torch.Tensor]:
    """`tensors` with the adapter folded into each adapted weight (new tensors; the rest shared)."""
    check_targets({name: tuple(t.shape) for name, t in tensors.items()}, adapter, where)
    return {name: fold_one(name, tensor, adapter) for name, tensor in tensors.items()}


def check_targets(shapes: dict[str, tuple[int, ...]], adapter: Adapter, where: str) -> None:
    """Every adapted module is in the model, at the adapter's shape."""
    for module, (a, b) in adapter.pairs.items():
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            raise InputError(where, None, f"the adapter {adapter.ref} adapts {module}, which the model lacks")
        if (b.shape[0], a.shape[1]) != shape:
            raise InputError(
                where, None, f"the adapter's {module} is {b.shape[0]} x {a.shape[1]}, the model's is {shape}"
            )


def fold_one(name: str, weight: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """`weight` (tensor `name` of the model) with its adapter pair folded in, or itself when it has none."""
    pair = adapter.pairs.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if pair is None:
        return weight
    a, b = pair
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    delta = (b.to(weight.device) @ a.to(weight.device)) * adapter.scaling
    merged = weight.clone()
    merged += delta  # in place, as PEFT folds it: the sum is rounded once, to the weight's dtype
    return merged
