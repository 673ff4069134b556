"""The genome room: how a vector of numbers becomes a mergekit recipe. Parameter-space genomes (per-layer,
per-module weights, densities, t) live in parameter_space.py; data-flow genomes (layer paths) in data_flow.py."""

from collections.abc import Sequence

from search.config import SearchConfig
from search.genome.data_flow import PathGenome
from search.genome.parameter_space import Genome, anchor_stride


def make_genome(config: SearchConfig, tensor_names: Sequence[str], num_layers: int) -> Genome | PathGenome:
    """The genome genome.kind asks for."""
    if config.genome.kind == "ps":
        return Genome(config, tensor_names, num_layers)
    return PathGenome(config, num_layers)


__all__ = ["Genome", "PathGenome", "anchor_stride", "make_genome"]
