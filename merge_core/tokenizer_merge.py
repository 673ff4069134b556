"""Merging models whose vocabularies differ, as mergekit 0.1.5 does it with `tokenizer_source` / `tokenizer:`.

An output tokenizer is built first: the base's (less any token at an id past the base's config vocab_size,
which has no embedding row), one model's as it is, or the union (the base's, then every other model's tokens
it lacks, then their added tokens), and the `tokenizer.tokens` keys it lacks are added to it. Each model then
gets a row map, output token id -> that model's row (-1 where it lacks the token), and every tensor indexed by
token (embed_tokens, lm_head) is rebuilt in output order before the usual merge reads it:

- a token every model has: each model's own row;
- a token some model lacks, for the models that lack it: the row of the one model that has it; zeros when none
  has it; the base's row when the base has it; else the mean of the rows of the models that have it;
- a `tokens:` entry says where that row comes from instead, and with `force` every model takes it;
- rows padded up to `pad_to_multiple_of` hold the mean of the real rows (of each model's rebuilt tensor).

Tokens are visited in id order wherever mergekit visits a hash-ordered vocabulary, so the union is the same on
every run (mergekit's is too whenever the order it would depend on is not a set's).
"""

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_core.errors import InputError
from merge_core.recipe import ModelTokenSource, Recipe, TokenSettings, ZeroSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabularySettings:
    """Everything the output vocabulary and the aligned rows depend on: the key a session caches them under."""

    source: str  # base, union or a model reference
    tokens: tuple[tuple[str, TokenSettings], ...]  # `tokenizer.tokens`, in the recipe's order
    pad_to_multiple_of: int | None
    base: str  # whose tokenizer the output starts from: base_model, else the first model
    models: tuple[str, ...]  # every model the recipe reads, in merge input order
    where: str = field(default="<dict>", compare=False)
    source_field: str = field(default="tokenizer_source", compare=False)  # where the recipe set `source`

    @classmethod
    def of(cls, recipe: Recipe) -> "VocabularySettings | None":
        """The recipe's settings, None when it keeps the sources' own (equal) vocabulary."""
        if recipe.vocabulary_source is None:
            return None
        block = recipe.tokenizer
        models = tuple(recipe.model_refs())
        return cls(
            source=recipe.vocabulary_source,
            tokens=tuple(((block and block.tokens) or {}).items()),
            pad_to_multiple_of=block.pad_to_multiple_of if block else None,
            base=recipe.base_model or models[0],
            models=models,
            where=recipe.where,
            source_field="tokenizer.source" if block else "tokenizer_source",
        )


@dataclass
class Vocabulary:
    tokenizer: Any  # the output tokenizer (transformers), written with the merge
    tokens: list[str]  # output id -> token
    size: int  # rows of every aligned tensor: len(tokens), padded
    rows: dict[str, torch.Tensor]  # model -> (len(tokens),) int64: its row for each output token, -1 if none
    model_vocabs: dict[str, dict[str, int]]  # model -> its tokenizer's token -> id, for model_token sources


def build_vocabulary(settings: VocabularySettings, dirs: Mapping[str, Path], sizes: Mapping[str, int]) -> Vocabulary:
    """The output tokenizer and every model's row map. `dirs`: each model's tokenizer directory (the tokenizer
    source's too), `sizes`: each model's config vocab_size (its embedding rows; None: as many as its tokens)."""
    where = settings.where
    base = _load(dirs[settings.base], settings.base, where)
    base = _stripped(base, sizes.get(settings.base) or len(base.get_vocab()), settings.base, where)
    tokenizers = {settings.base: base}
    for ref in settings.models:
        if ref not in tokenizers:
            try:
                tokenizers[ref] = _load(dirs[ref], ref, where)
            except InputError as error:
                # mergekit too goes on, taking such a model's vocabulary to be the base's.
                logger.warning("%s; its vocabulary is taken to be %s's", error, settings.base)
    # Read now: in base mode the output tokenizer is the base's own object, which the added tokens then change.
    model_vocabs = {ref: tokenizer.get_vocab() for ref, tokenizer in tokenizers.items()}
    if settings.source == "base":
        out = base
    elif settings.source == "union":
        out = _union(base, tokenizers, sizes)
    else:
        out = _load(dirs[settings.source], settings.source, where)
    for token, _ in settings.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        if index >= len(vocab):
            raise InputError(
                where, settings.source_field, f"the output tokenizer's ids have gaps (token {token!r} is {index})"
            )
        tokens[index] = token
    rows = {}
    for ref in settings.models:
        own = model_vocabs.get(ref, model_vocabs[settings.base])
        rows[ref] = _row_map(tokens, own, sizes.get(ref) or len(own), ref)
    size = len(tokens)
    multiple = settings.pad_to_multiple_of
    if multiple and size % multiple:
        size += multiple - size % multiple
    return Vocabulary(tokenizer=out, tokens=tokens, size=size, rows=rows, model_vocabs=model_vocabs)


def _load(directory: Path, ref: str, where: str) -> Any:
    from transformers import AutoTokenizer  # only tokenizer merges pay for the import

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise InputError(where, None, f"{ref}: its tokenizer does not load ({error})") from None


def _stripped(tokenizer: Any, vocab_size: int, ref: str, where: str) -> Any:
    """`tokenizer` without the tokens at ids >= `vocab_size`: the model has no rows for them, so they must not
    reach the output vocabulary. Only a fast BPE tokenizer's can be cut (as in mergekit)."""
    unused = {token for token, index in tokenizer.get_vocab().items() if index >= vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer._tokenizer.to_str()) if tokenizer.is_fast else None
    kind = data["model"]["type"] if data else "a slow tokenizer"
    if kind != "BPE":
        raise InputError(
            where,
            None,
            f"{ref}: its tokenizer has {len(unused)} token(s) past its vocab_size {vocab_size} and is {kind}: "
            "only a BPE tokenizer's can be cut for a tokenizer merge",
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)
    data["model"]["merges"] = [pair for pair in data["model"]["merges"] if not unused & set(_merge_parts(pair))]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _merge_parts(pair: str | list) -> list[str]:
    # tokenizer.json writes a BPE merge as "a b" (older files) or ["a", "b"]
    if isinstance(pair, str) and pair.count(" ") == 1:
        return pair.split(" ")
    if isinstance(pair, list):
        return pair
    raise ValueError(f"unexpected BPE merge {pair!r}")


def _union(base: Any, tokenizers: Mapping[str, Any], sizes: Mapping[str, int]) -> Any:
    """A copy of `base` extended by every other tokenizer's tokens it lacks: plain tokens first (first seen,
    models in order, each in id order), then every added token with the settings of the first model to add it."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tokenizer in tokenizers.items():
        size = sizes.get(ref) or tokenizer.vocab_size
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size:
                plain.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index >= size:
                continue
            if info.content in added and added[info.content] != info:
                logger.warning("token %r is added with different settings by %s: the first model's are kept", info, ref)
            added.setdefault(info.content, info)
    # Saved and loaded again: a fresh object (the base's stays as it is), and the files mergekit's copy gives.
    with tempfile.TemporaryDirectory() as scratch:
        base.save_pretrained(scratch, legacy_format=False)
        out = AutoTokenizer.from_pretrained(scratch)
    base_vocab = base.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _row_map(tokens: list[str], own: Mapping[str, int], vocab_size: int, ref: str) -> torch.Tensor:
    rows = torch.full((len(tokens),), -1, dtype=torch.int64)
    for out_id, token in enumerate(tokens):
        index = own.get(token)
        if index is None:
            continue
        if index >= vocab_size:
            # mergekit fails on such a token later; it has no row in this model, so it counts as missing here.
            logger.warning(
                "%s: token %r has id %d, past its vocab_size %d: taken as missing", ref, token, index, vocab_size
            )
            continue
        rows[out_id] = index
    return rows


def align(
    vocabulary: Vocabulary,
    settings: VocabularySettings,
    tensors: Mapping[str, torch.Tensor],
    base: str | None,
    axis: int,
    name: str,
) -> dict[str, torch.Tensor]:
    """Each model's `name` tensor rebuilt with one row (along `axis`) per output token, in output order.
    `tensors`: the merge's inputs in merge order; `base`: the slice's base_model when it is one of them."""
    models = list(tensors)
    views = [tensor.movedim(axis, 0) for tensor in tensors.values()]
    if any(view.shape[1:] != views[0].shape[1:] for view in views):
        shapes = ", ".join(f"{ref} {tuple(tensor.shape)}" for ref, tensor in tensors.items())
        raise InputError(settings.where, None, f"{name}: only the vocabulary axis may differ, got {shapes}")
    dtype = views[0].dtype
    for view in views:
        dtype = torch.promote_types(dtype, view.dtype)
    rows = torch.stack([vocabulary.rows[ref] for ref in models]).to(views[0].device)
    fill = _fill_rows(vocabulary, settings, models, views, rows, base, dtype, name)
    forced = _forced(vocabulary, settings, rows.device)
    count = len(vocabulary.tokens)
    out = {}
    for ref, view, own in zip(models, views, rows, strict=True):
        new = torch.zeros((vocabulary.size, *view.shape[1:]), dtype=dtype, device=view.device)
        new[:count] = fill
        ids = ((own >= 0) & ~forced).nonzero().squeeze(1)
        new[ids] = view[own[ids]].to(dtype)
        if vocabulary.size > count:
            # the padding rows get the mean embedding, which disturbs the model least (mergekit's choice)
            new[count:] = torch.mean(new[:count], dim=0)
        out[ref] = new.movedim(0, axis)
    return out


def _forced(vocabulary: Vocabulary, settings: VocabularySettings, device: torch.device) -> torch.Tensor:
    forced = torch.zeros(len(vocabulary.tokens), dtype=torch.bool, device=device)
    index = {token: out_id for out_id, token in enumerate(vocabulary.tokens)}
    for token, entry in settings.tokens:
        if entry.force:
            forced[index[token]] = True
    return forced


def _fill_rows(
    vocabulary: Vocabulary,
    settings: VocabularySettings,
    models: list[str],
    views: list[torch.Tensor],
    rows: torch.Tensor,
    base: str | None,
    dtype: torch.dtype,
    name: str,
) -> torch.Tensor:
    """For each output token, the row a model gets when it lacks the token (or every model, when forced)."""
    present = rows >= 0
    fill = torch.zeros((len(vocabulary.tokens), *views[0].shape[1:]), dtype=dtype, device=views[0].device)
    configured = dict(settings.tokens)
    needed = ~present.all(0) | _forced(vocabulary, settings, rows.device)
    base_index = models.index(base) if base in models else None
    averaged = []
    for out_id in needed.nonzero().squeeze(1).tolist():
        token = vocabulary.tokens[out_id]
        if token in configured:
            pick = _configured_row(vocabulary, settings, models, views, rows, token, out_id, name)
        else:
            holders = present[:, out_id].nonzero().squeeze(1).tolist()
            if len(holders) == 1:
                pick = holders[0], int(rows[holders[0], out_id])
            elif not holders:
                logger.warning("%s: token %r is in no model's vocabulary: its row is zeros", name, token)
                pick = None
            elif base_index is not None and present[base_index, out_id]:
                pick = base_index, int(rows[base_index, out_id])
            else:
                averaged.append(out_id)
                continue
        if pick is not None:
            fill[out_id] = views[pick[0]][pick[1]]
    if averaged:
        _average_into(fill, torch.tensor(averaged, device=rows.device), views, rows)
    return fill


def _average_into(fill: torch.Tensor, ids: torch.Tensor, views: list[torch.Tensor], rows: torch.Tensor) -> None:
    """fill[ids] = the mean of the rows of the models that have each token: summed in model order from zeros,
    then divided by the count, the same operations as mergekit's one token at a time."""
    total = torch.zeros((len(ids), *fill.shape[1:]), dtype=fill.dtype, device=fill.device)
    for view, own in zip(views, rows, strict=True):
        has = own[ids] >= 0
        total[has] = total[has] + view[own[ids][has]]
    counts = (rows[:, ids] >= 0).sum(0)
    for count in counts.unique().tolist():
        chosen = counts == count
        part = total[chosen]
        part /= count
        total[chosen] = part
    fill[ids] = total


def _configured_row(
    vocabulary: Vocabulary,
    settings: VocabularySettings,
    models: list[str],
    views: list[torch.Tensor],
    rows: torch.Tensor,
    token: str,
    out_id: int,
    name: str,
) -> tuple[int, int] | None:
    """(input index, row) of a `tokens:` entry's source; None for zeros."""
    source = dict(settings.tokens)[token].source
    if isinstance(source, ZeroSource):
        return None
    model = source.model if isinstance(source, ModelTokenSource) else source
    path = f"tokenizer.tokens.{token}.source"
    if model not in models:
        raise InputError(
            settings.where, path, f"{model} is not an input of {name} (its rows come from {', '.join(models)})"
        )
    index = models.index(model)
    if not isinstance(source, ModelTokenSource):
        if rows[index, out_id] < 0:
            raise InputError(settings.where, path, f"{model} has no token {token!r}: name a model that has it")
        return index, int(rows[index, out_id])
    row = source.token_id
    if row is None:
        row = vocabulary.model_vocabs.get(model, {}).get(source.token)
        if row is None:
            raise InputError(settings.where, f"{path}.token", f"{model}'s tokenizer has no token {source.token!r}")
    if row >= views[index].shape[0]:
        raise InputError(
            settings.where, f"{path}.token_id", f"{row} is past {model}'s {views[index].shape[0]} rows of {name}"
        )
    return index, row
