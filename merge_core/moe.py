"""A Mixture of Experts from fine-tunes, as `mergekit-moe` 0.1.5 builds one with its Mixtral output.

The base model gives attention, norms, embeddings and lm_head; each expert gives its MLP (gate_proj, down_proj,
up_proj as experts.N.w1, w2, w3); each layer's router row for an expert comes from the gate mode: the base's
hidden states over the expert's prompts (minus its negative prompts), their mean token embedding, or random.
Every number follows mergekit-moe's arithmetic (bfloat16 hidden states, sums then divisions, the same RNG
draws in the same order), so the tensors come out equal to its. The layout differs on purpose: mergekit 0.1.5
writes transformers 5's fused `mlp.experts.gate_up_proj`, evomerge the per-expert `block_sparse_moe` names
that transformers 5 converts on loading and that vLLM's Mixtral loader reads.
"""

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from merge_core.errors import InputError
from merge_core.moe_config import RANDOM_MODES, Expert, MoEConfig
from merge_core.recipe import DTYPES
from merge_core.sources import Checkpoint, load_lazily
from merge_core.writer import DEFAULT_SHARD_BYTES, write_checkpoint

logger = logging.getLogger(__name__)

SOURCE_TYPES = ("llama", "mistral")
# (source MLP weight, Mixtral expert weight), in mergekit-moe's order: noise is drawn in this order.
EXPERT_WEIGHTS = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
# A router whose expert rows are this ill-conditioned routes most tokens to few experts (mergekit's threshold).
DEGENERATE_CONDITION = 5.0
ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


def build_moe(
    config: MoEConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_all_same: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the MoE checkpoint to `out_dir` atomically. `seed` seeds the random gate modes and `noise_scale`
    (`mergekit-moe --random-seed N` draws the same numbers); `allow_all_same` builds experts that are all one
    model (mergekit's --i-understand-this-is-not-useful-without-training)."""
    sources = MoESources(config, device=device, allow_all_same=allow_all_same)
    generator = torch.Generator().manual_seed(seed)
    routers = sources.routers(config, generator)
    warn_about_routers(config, routers)
    return write_checkpoint(
        Path(out_dir),
        moe_tensors(config, sources.checkpoints, routers, sources.out_dtype, generator),
        config=sources.mixtral_config(config).to_diff_dict(),
        tokenizer_dir=sources.base.path,
        recipe_yaml=config.to_yaml(),
        recipe_file="mergekit_moe_config.yml",
        shard_bytes=shard_bytes,
    )


class MoESources:
    """A config's models loaded (lazily) and checked, and its prompt routers computed, once: the prompts' forward
    pass is the expensive part, and each expert's row depends only on its own prompts, so any config over a
    subset of these experts (the MoE search's candidates) takes its rows from here, the same numbers."""

    def __init__(self, config: MoEConfig, *, device: str = "cpu", allow_all_same: bool = False):
        from transformers import AutoConfig

        self.checkpoints = load_sources(config, allow_all_same)
        self.base = self.checkpoints[config.base_model]
        self.base_config = AutoConfig.from_pretrained(self.base.path)
        self.out_dtype = DTYPES.get(config.dtype) or DTYPES.get(str(self.base_config.dtype).removeprefix("torch."))
        self.rows: dict[tuple, torch.Tensor] = {}  # expert_key -> its router row per layer, (layers, hidden)
        if config.gate_mode not in RANDOM_MODES:
            routers = router_weights(config, self.base, torch.Generator(), device)  # prompt modes draw nothing
            self.rows = {expert_key(e): routers[:, i] for i, e in enumerate(config.experts)}

    def routers(self, config: MoEConfig, generator: torch.Generator) -> torch.Tensor:
        """`config`'s routers (layers, experts, hidden): random modes draw them from `generator` as build_moe
        does, prompt modes stack the rows computed once (an expert not among them is a KeyError)."""
        if config.gate_mode in RANDOM_MODES:
            return router_weights(config, self.base, generator, "cpu")
        return torch.stack([self.rows[expert_key(expert)] for expert in config.experts], dim=1)

    def mixtral_config(self, config: MoEConfig):
        from transformers import MixtralConfig

        settings = self.base_config.to_dict() | {
            "architectures": ["MixtralForCausalLM"],
            "num_local_experts": len(config.experts),
            "num_experts_per_tok": config.experts_per_token,
            "sliding_window": None,  # Llama attends to everything; a Mistral base's window is dropped, as mergekit does
        }
        if self.out_dtype is not None:
            settings["dtype"] = str(self.out_dtype).removeprefix("torch.")
        return MixtralConfig(**settings)


def expert_key(expert: Expert) -> tuple:
    """What an expert's router row depends on in a prompt gate mode."""
    return expert.source_model, tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())


def load_sources(config: MoEConfig, allow_all_same: bool = False) -> dict[str, Checkpoint]:
    """Every model the config names, loaded lazily (headers only until a tensor is read) and checked."""
    checkpoints = {ref: load(config, field, ref) for field, ref in source_fields(config)}
    check_sources(config, checkpoints, allow_all_same)
    return checkpoints


def source_fields(config: MoEConfig) -> list[tuple[str, str]]:
    """(field, model reference) of every model the config names, base first."""
    experts = [(f"experts[{i}].source_model", expert.source_model) for i, expert in enumerate(config.experts)]
    return [("base_model", config.base_model), *experts]


def load(config: MoEConfig, field: str, ref: str) -> Checkpoint:
    try:
        return load_lazily(ref)
    except InputError as error:  # a missing model is the config's field, not a stray path
        raise InputError(config.where, field, str(error)) from None


def mlp_names(layers: int) -> list[str]:
    return [f"model.layers.{layer}.mlp.{weight}.weight" for layer in range(layers) for weight, _ in EXPERT_WEIGHTS]


def check_sources(config: MoEConfig, checkpoints: dict[str, Checkpoint], allow_all_same: bool) -> None:
    """Every model a Llama or Mistral of the base's type, without biases, with MLPs shaped as the base's."""
    where, base = config.where, checkpoints[config.base_model]
    base_type = base.config.get("model_type")
    for field, ref in source_fields(config):
        source = checkpoints[ref]
        model_type = source.config.get("model_type")
        if model_type not in SOURCE_TYPES:
            raise InputError(where, field, f"expected a Llama or Mistral model (Mixtral's experts), got {model_type}")
        if model_type != base_type:
            raise InputError(where, field, f"expected the base_model's architecture {base_type}, got {model_type}")
        if source.config.get("attention_bias") or source.config.get("mlp_bias"):
            raise InputError(where, field, "expected a model without attention or MLP biases (Mixtral has none)")
        for name in mlp_names(base.config["num_hidden_layers"]):
            if name not in source.shapes:
                raise InputError(where, field, f"expected a Llama-style MLP, the checkpoint lacks {name}")
            if source.shapes[name] != base.shapes[name]:
                raise InputError(
                    where, field, f"{name} has shape {source.shapes[name]}, the base_model's {base.shapes[name]}"
                )
    if config.gate_mode in RANDOM_MODES:
        return
    if len({expert.source_model for expert in config.experts}) == 1 and not allow_all_same:
        raise InputError(
            where,
            "experts",
            f"every expert is the same model, which only costs more than that model; {ALL_SAME_FLAG} builds it "
            "anyway (to train it)",
        )


def router_weights(config: MoEConfig, base: Checkpoint, generator: torch.Generator, device: str) -> torch.Tensor:
    """The routers, (layers, experts, hidden): one unit row per expert per layer, or random rows."""
    shape = (base.config["num_hidden_layers"], len(config.experts), base.config["hidden_size"])
    if config.gate_mode == "random":
        return torch.randn(shape, generator=generator)
    if config.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / shape[2])  # torch.nn.Linear's default initialisation range
        return torch.rand(shape, generator=generator) * 2 * bound - bound
    embed = prompt_embedder(config, base, device)
    rows = []
    for expert in config.experts:
        row = embed(expert.positive_prompts)
        if expert.negative_prompts:
            row = row - embed(expert.negative_prompts)
        rows.append(unit(row))
    return torch.stack(rows, dim=1).cpu()


def unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_embedder(config: MoEConfig, base: Checkpoint, device: str) -> Callable[[list[str]], torch.Tensor]:
    """prompts -> one vector per layer, (layers, hidden), by `config.gate_mode`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as error:
        problem = " ".join(str(error).split())[:200]
        raise InputError(
            config.where, "base_model", f"gate_mode {config.gate_mode} tokenizes the prompts: no tokenizer ({problem})"
        ) from None
    # Left padding puts every prompt's last token last. The pad token matters only to hidden_avg, which
    # averages over the padding too: the bos token, as mergekit pads.
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    layers = base.config["num_hidden_layers"]

    def tokenize(prompts: list[str]):
        texts = [(tokenizer.bos_token or "") + prompt for prompt in prompts]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    if config.gate_mode == "cheap_embed":
        embedding = base.tensors["model.embed_tokens.weight"].float()

        def mean_embedding(prompts: list[str]) -> torch.Tensor:
            batch = tokenize(prompts)
            # Rows gathered where mergekit multiplies by one-hot vectors: the same numbers, no tokens x vocab matrix.
            rows = embedding[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
            return unit(rows.sum(dim=1).sum(dim=0, keepdim=True)).repeat(layers, 1)

        return mean_embedding

    # bfloat16, as mergekit-moe runs the base, so that the routers come out equal to its.
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16, device_map=device)
    average = config.gate_mode == "hidden_avg"

    @torch.no_grad()
    def hidden_states(prompts: list[str]) -> torch.Tensor:
        output = model(**tokenize(prompts).to(model.device), output_hidden_states=True)
        states = torch.stack(output.hidden_states[:-1])  # each layer's input: (layers, prompts, positions, hidden)
        # Sums divided by counts rather than means: mergekit's rounding in bfloat16.
        states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]

    return hidden_states


def warn_about_routers(config: MoEConfig, routers: torch.Tensor) -> None:
    count = len(config.experts)
    if count & (count - 1):
        logger.warning(
            "%s: experts: %d experts, not a power of two: llama.cpp cannot run the model", config.where, count
        )
    degenerate = [
        str(layer)
        for layer in range(routers.shape[0])
        if torch.linalg.cond(routers[layer].float()) > DEGENERATE_CONDITION
    ]
    if degenerate:
        logger.warning(
            "%s: experts: the routers of layer(s) %s barely tell the experts apart (prompts too similar?): "
            "some experts will be underused",
            config.where,
            ", ".join(degenerate),
        )


def moe_tensors(
    config: MoEConfig,
    checkpoints: dict[str, Checkpoint],
    routers: torch.Tensor,
    out_dtype: torch.dtype | None,
    generator: torch.Generator,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors but its MLPs, then every layer's experts, then the routers: mergekit's order, which is
    also the order `noise_scale` draws from `generator` in."""
    base = checkpoints[config.base_model]
    for name in base.tensors:
        if ".mlp." not in name and not name.endswith("rotary_emb.inv_freq"):
            yield name, base.tensors[name].to(dtype=out_dtype)
    for layer in range(routers.shape[0]):
        for index, expert in enumerate(config.experts):
            source = checkpoints[expert.source_model].tensors
            for weight, expert_weight in EXPERT_WEIGHTS:
                tensor = source[f"model.layers.{layer}.mlp.{weight}.weight"]
                if expert.noise_scale is not None:
                    noise = torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator)
                    tensor = tensor + noise * expert.noise_scale
                if weight == "down_proj" and expert.residual_scale is not None:
                    tensor = tensor * expert.residual_scale
                name = f"model.layers.{layer}.block_sparse_moe.experts.{index}.{expert_weight}.weight"
                yield name, tensor.to(dtype=out_dtype)
    for layer in range(routers.shape[0]):
        yield f"model.layers.{layer}.block_sparse_moe.gate.weight", routers[layer].to(dtype=out_dtype)
