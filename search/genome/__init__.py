"""The genome room: how a vector of numbers becomes a mergekit recipe. Parameter-space genomes (per-layer,
per-module weights, densities, t) live in parameter_space.py; data-flow genomes (layer paths) in data_flow.py;
MoE genomes (which experts, how loud) in moe.py, whose candidates are mergekit-moe configs."""

from collections.abc import Sequence

from search.config import SearchConfig
from search.genome.data_flow import PathGenome, path_line
from search.genome.moe import MoEGenome, experts_line
from search.genome.parameter_space import Genome, anchor_stride


def make_genome(config: SearchConfig, tensor_names: Sequence[str], num_layers: int) -> Genome | PathGenome | MoEGenome:
    """The genome genome.kind asks for."""
    if config.genome.kind == "ps":
        return Genome(config, tensor_names, num_layers)
    if config.genome.kind == "moe":
        return MoEGenome(config)
    return PathGenome(config, num_layers)


def trial_line(config: SearchConfig, recipe_yaml: str) -> str | None:
    """A trial in one line, where its genome has a readable shape: a layer path, or an MoE's experts and scales;
    None for a parameter-space search (no recipe parsed)."""
    if config.genome.kind == "ps":
        return None
    return experts_line(recipe_yaml) if config.genome.kind == "moe" else path_line(recipe_yaml)


__all__ = ["Genome", "MoEGenome", "PathGenome", "anchor_stride", "make_genome", "trial_line"]
