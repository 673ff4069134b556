"""A live Mixtral for any mergekit-moe config over one set of sources, built in memory: the MoE search scores
each candidate on it without writing a checkpoint.

The tensors are build_moe's own (merge_core/moe.py: the same routers, noise draws and residual scales), laid
out as transformers 5's Mixtral holds them (the fused layout from_pretrained converts evomerge's per-expert
names to), so the model is the one `AutoModelForCausalLM.from_pretrained` loads from `evomerge moe`'s output.
One model is kept and written over in place; it is rebuilt only when the expert count (or experts per token)
changes its modules.
"""

import torch

from merge_core.moe import MoESources, moe_tensors
from merge_core.moe_config import MoEConfig

EXPERTS = ".block_sparse_moe.experts."


def fused_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors in transformers 5's fused Mixtral names (what mergekit 0.1.5 writes too):
    gate_up_proj (experts, 2 x intermediate, hidden) is each expert's w1 over its w3, down_proj stacks the w2s."""
    out = {name: tensor for name, tensor in tensors.items() if ".block_sparse_moe." not in name}
    for name, router in tensors.items():
        if not name.endswith("block_sparse_moe.gate.weight"):
            continue
        prefix = name.removesuffix(".block_sparse_moe.gate.weight")
        w1, w2, w3 = (
            [tensors[f"{prefix}{EXPERTS}{i}.{weight}.weight"] for i in range(len(router))]
            for weight in ("w1", "w2", "w3")
        )
        out[f"{prefix}.mlp.gate.weight"] = router
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(w1, w3, strict=True)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(w2)
    return out


class MoEModel:
    def __init__(self, sources: MoESources, device: str = "cpu"):
        self.sources, self.device = sources, device
        self.model = None  # the live MixtralForCausalLM, built on the first candidate
        self.shape = (0, 0)  # its (experts, experts per token): what its modules are built for

    def build(self, config: MoEConfig, seed: int = 0) -> bool:
        """Make `config`'s MoE the live model (`seed` as build_moe's); True when the model object is new (a
        wrapper holding the old one must be remade)."""
        from transformers import MixtralForCausalLM

        generator = torch.Generator().manual_seed(seed)
        routers = self.sources.routers(config, generator)
        tensors = dict(moe_tensors(config, self.sources.checkpoints, routers, self.sources.out_dtype, generator))
        shape = (len(config.experts), config.experts_per_token)
        rebuilt = self.shape != shape
        if rebuilt:
            self.model = None  # the old one's memory goes before the new one is allocated
            mixtral = self.sources.mixtral_config(config)
            # constructed in its dtype, as from_pretrained does: a cast afterwards would cast the rotary buffers too
            self.model = MixtralForCausalLM._from_config(mixtral, dtype=mixtral.dtype).to(self.device).eval()
            self.shape = shape
        # Tied embeddings: the checkpoint has no lm_head, the model's is the embedding (tied at construction).
        missing, unexpected = self.model.load_state_dict(fused_layout(tensors), strict=False)
        tied = self.model.config.tie_word_embeddings
        if unexpected or [name for name in missing if not (tied and name == "lm_head.weight")]:
            raise ValueError(f"MoE tensors do not fit Mixtral: missing {missing}, unexpected {unexpected}")
        return rebuilt
