"""The genome room: how a vector of numbers becomes a mergekit recipe. Parameter-space genomes (per-layer,
per-module weights, densities, t) live in parameter_space.py; data-flow genomes (layer paths) go beside it."""

from search.genome.parameter_space import Genome, anchor_stride

__all__ = ["Genome", "anchor_stride"]
