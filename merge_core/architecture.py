"""Where each tensor sits in a decoder, read from tensor names alone (no per-architecture tables).

Layer tensors are the ones with a dotted integer component: `model.layers.7.mlp.up_proj.weight` is layer 7
(`transformer.h.7.`, `gpt_neox.layers.7.` alike); the first such component is the layer index. Every other
tensor is a pre-weight (merged before the layers) or a post-weight (after them). Checkpoint order cannot
decide which: safetensors lists names sorted, which puts `lm_head.weight` before `model.embed_tokens.weight`.
So the rule is by name: pre-weights are the input embeddings, i.e. a name component containing "emb" but
not "out" (embed_tokens, embeddings, embd, rotary_pos_emb; GPT-NeoX's output `embed_out` is not one), GPT-2's
`wte`/`wpe`, or a positional encoding `*_pe`; everything else (final norm, lm_head, score) is a post-weight.
tests/test_plan.py checks this rule against every architecture table mergekit ships.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from merge_core.errors import InputError

SOURCES = "source checkpoints"  # what an error blames when only the tensor names are known

LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Layout:
    pre: tuple[str, ...]  # non-layer tensors merged before the layers, in the given order
    layer: tuple[str, ...]  # the tensors of one layer, named as in layer 0
    post: tuple[str, ...]  # non-layer tensors merged after the layers, in the given order
    num_layers: int


def layer_index(name: str) -> int | None:
    match = LAYER_INDEX.search(name)
    return None if match is None else int(match.group(1))


def rename_layer(name: str, new_index: int) -> str:
    """`name` moved to layer `new_index`; e.g. ('model.layers.3.mlp.weight', 0) -> 'model.layers.0.mlp.weight'."""
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name} is not a layer tensor")
    return f"{name[: match.start()]}.{new_index}.{name[match.end() :]}"


def is_pre_weight(name: str) -> bool:
    components = name.split(".")[:-1] or [name]
    return any(
        ("emb" in part and "out" not in part) or part in ("wte", "wpe") or part.endswith("_pe") for part in components
    )


# Tensors with one row per token (the input embeddings and the output head), as mergekit's architecture tables
# mark them: the rows a tokenizer merge reorders. Named by the component before `.weight`.
VOCABULARY_TENSORS = {"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output_layer"}


def vocabulary_axis(name: str) -> int | None:
    """The axis of `name` indexed by token id (0 for every tensor mergekit marks), None when there is none."""
    parts = name.split(".")
    return 0 if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in VOCABULARY_TENSORS else None


def layout(tensor_names: Sequence[str]) -> Layout:
    """Split a model's tensor names into pre-weights, one layer's tensors and post-weights."""
    layers: dict[int, list[str]] = {}
    prefixes = set()
    outside = []
    for name in tensor_names:
        match = LAYER_INDEX.search(name)
        if match is None:
            outside.append(name)
            continue
        prefixes.add(name[: match.start()])
        layers.setdefault(int(match.group(1)), []).append(rename_layer(name, 0))
    if len(prefixes) > 1:
        raise InputError(
            SOURCES, None, f"tensor names hold more than one layer stack ({', '.join(sorted(prefixes))}): not supported"
        )
    count = max(layers, default=-1) + 1
    first = layers.get(0, [])
    for index in range(count):
        missing = sorted(set(first).symmetric_difference(layers.get(index, [])))
        if missing:
            raise InputError(
                SOURCES,
                None,
                f"layer {index} does not have the same tensors as layer 0 ({rename_layer(missing[0], index)})",
            )
    return Layout(
        pre=tuple(name for name in outside if is_pre_weight(name)),
        layer=tuple(dict.fromkeys(first)),
        post=tuple(name for name in outside if not is_pre_weight(name)),
        num_layers=count,
    )


def num_layers(tensor_names: Sequence[str]) -> int:
    return layout(tensor_names).num_layers


def text_config(config: dict) -> dict:
    """The language model's part of a config.json: a multimodal one keeps its sizes in text_config."""
    return config.get("text_config", config)
