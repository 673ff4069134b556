"""Write a merged model as a Hugging Face checkpoint directory, atomically.

Everything goes into a temporary sibling directory first and is renamed into place at the end, so an error
(or a kill) never leaves a half-written OUT_DIR behind.
"""

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merge_core.chat_template import save_built_tokenizer, save_tokenizer

DEFAULT_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Not a tokenizer file, but it travels with one: kept even when the tokenizer is rewritten for a chat template
# (mergekit's rewrite drops it).
GENERATION_CONFIG = "generation_config.json"


def write_checkpoint(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config: dict,
    tokenizer_dir: Path,
    recipe_yaml: str,
    chat_template: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer: Any = None,
    recipe_file: str = "mergekit_config.yml",
) -> Path:
    """`chat_template`: Jinja text for the tokenizer, which is then rewritten through transformers, not copied.
    `tokenizer`: a built tokenizer (a tokenizer merge's) saved through transformers instead of `tokenizer_dir`'s
    files; generation_config.json still comes from `tokenizer_dir`. `recipe_file`: the name `recipe_yaml` is saved
    under (mergekit-moe's is mergekit_moe_config.yml)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_shards(staging, tensors, shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            save_built_tokenizer(tokenizer, staging, chat_template)
            copied = (GENERATION_CONFIG,)
        elif chat_template is None:
            copied = (*TOKENIZER_FILES, GENERATION_CONFIG)
        else:
            save_tokenizer(tokenizer_dir, staging, chat_template)
            copied = (GENERATION_CONFIG,)
        for name in copied:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, staging / name)
        (staging / recipe_file).write_text(recipe_yaml)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def write_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int) -> None:
    """Fill shards up to `shard_bytes` each, holding at most one shard's tensors in memory."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    storages: set[int] = set()  # the storage of every tensor in the current shard
    shard_files: list[Path] = []
    size = total = 0

    def flush() -> None:
        path = directory / f"shard-{len(shard_files):05d}.tmp"
        save_file(shards[-1], path, metadata={"format": "pt"})
        shard_files.append(path)
        shards[-1] = {}
        storages.clear()

    weight_map: dict[str, int] = {}
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in storages:
            # A frankenmerge that reuses a layer yields the same source tensor under two names, and safetensors
            # refuses tensors sharing memory in one file: copy the repeat, only here, where a file needs it.
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        shards[-1][name] = tensor
        weight_map[name] = len(shard_files)
        size += nbytes
        total += nbytes
    flush()

    if len(shard_files) == 1:
        shard_files[0].rename(directory / "model.safetensors")
        return
    count = len(shard_files)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for path, name in zip(shard_files, names, strict=True):
        path.rename(directory / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {tensor: names[shard] for tensor, shard in weight_map.items()},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Rename staging onto out_dir; an existing out_dir is moved aside first and removed only after."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
