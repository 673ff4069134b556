"""Source checkpoints: find a model's files (local directory or Hugging Face hub id) and load its tensors.

Safetensors are preferred; a `.bin` checkpoint is read only through `torch.load(weights_only=True)` so that
loading a model can never execute pickled code.
"""

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_core.architecture import vocabulary_axis
from merge_core.errors import InputError
from merge_core.lora import Adapter, check_targets, fold, fold_one, read_adapter, split_lora
from merge_core.sharding import Shard

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# What a merge needs from a hub repo: weights, configs and tokenizer files, nothing else.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# safetensors header dtype names (safetensors' Dtype enum) -> torch
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class CheckpointInfo:
    """What preflight needs: a checkpoint's config and tensor shapes, read from headers without the weights."""

    ref: str  # the model reference as the recipe wrote it
    path: Path  # local directory holding its files
    config: dict  # config.json
    shapes: dict[str, tuple[int, ...]]  # every weight's shape, in checkpoint order
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # every weight's dtype, as stored

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size") or self.config.get("text_config", {}).get("vocab_size")


@dataclass
class Checkpoint(CheckpointInfo):
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_model_dir(ref: str) -> Path:
    """A local directory as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(ref, None, "expected a model directory, found a file")
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise InputError(ref, None, "no such model directory")
    from huggingface_hub import snapshot_download  # only users of hub ids pay for the import

    try:
        return Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line for the user
        raise InputError(ref, None, f"not a local directory and not downloadable from the hub ({err})") from None


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors first."""
    for index_name in (SAFETENSORS_INDEX, PYTORCH_BIN_INDEX):
        index = path / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / name for name in dict.fromkeys(weight_map.values())]
    for single in (SAFETENSORS, PYTORCH_BIN):
        if (path / single).exists():
            return [path / single]
    raise InputError(path, None, f"no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN})")


def read_shard(file: Path, device: str, shard: Shard) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, "pt", device=device) as handle:
            out = {}
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is no dict
                part = handle.get_slice(name)
                index = shard.index(name, tuple(part.get_shape()))
                out[name] = handle.get_tensor(name) if index is None else part[index]
            return out
    except Exception as err:  # noqa: BLE001 - corrupt files must not end in a traceback
        raise InputError(file, None, f"cannot read weights ({type(err).__name__}: {err})") from None


def read_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file, device=device)
        return torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise InputError(file, None, "weight file listed in the index is missing") from None
    except Exception as err:  # noqa: BLE001 - corrupt files must not end in a traceback
        raise InputError(file, None, f"cannot read weights ({type(err).__name__}: {err})") from None


def read_config(ref: str) -> tuple[Path, dict]:
    """The model's directory and config.json (of a `model+adapter` reference: the model's)."""
    path = resolve_model_dir(split_lora(ref)[0])
    config_file = path / "config.json"
    if not config_file.exists():
        raise InputError(ref, None, f"no config.json in {path}")
    return path, json.loads(config_file.read_text())


def read_info(ref: str) -> CheckpointInfo:
    """Config and shapes only: safetensors headers are read, .bin files must be loaded (weights_only)."""
    path, config = read_config(ref)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            tensors = read_tensors(file, "cpu")
            shapes.update({name: tuple(t.shape) for name, t in tensors.items()})
            dtypes.update({name: t.dtype for name, t in tensors.items()})
            continue
        for name, (shape, dtype) in read_safetensors_header(file).items():
            shapes[name], dtypes[name] = shape, dtype
    if not shapes:
        raise InputError(ref, None, "the checkpoint holds no tensors")
    return CheckpointInfo(ref=ref, path=path, config=config, shapes=shapes, dtypes=dtypes)


def read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each tensor's shape and dtype from a safetensors file's header (a little-endian u64 length, then JSON),
    reading only those bytes: no mapping of the file, so a header describing 140 GB costs what one of 1 MB
    does. A header whose tensors run past the end of the file (a truncated download) is refused."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
            size = os.fstat(handle.fileno()).st_size
        header.pop("__metadata__", None)
        tensors = {
            name: (tuple(int(n) for n in entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
            for name, entry in header.items()
        }
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except FileNotFoundError:
        raise InputError(file, None, "weight file listed in the index is missing") from None
    except Exception as err:  # noqa: BLE001 - corrupt headers must not end in a traceback
        raise InputError(file, None, f"cannot read weights ({type(err).__name__}: {err})") from None
    if 8 + length + end > size:
        raise InputError(
            file, None, f"cannot read weights: the header needs {8 + length + end} bytes, the file has {size}"
        )
    return tensors


class LazyTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors read from its memory-mapped safetensors files on each access and never kept, so
    an out-of-core merge holds only the tensors of the output tensor it is merging (mergekit's lazy loader)."""

    def __init__(self, files: dict[str, Path], device: str, adapter: Adapter | None):
        self.files, self.device, self.adapter = files, device, adapter  # tensor name -> its file
        self._handles: dict[Path, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = _open_lazily(file, self.device)
        handle = self._handles[file]
        tensor = handle.get_tensor(name) if file.suffix == ".safetensors" else handle[name].to(self.device)
        return tensor if self.adapter is None else fold_one(name, tensor, self.adapter)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _open_lazily(file: Path, device: str):
    """A safetensors file's memory-mapped handle, or a .bin file's tensors memory-mapped (weights_only, so no
    pickled code runs): either way nothing is read into memory until a tensor is used."""
    try:
        if file.suffix == ".safetensors":
            return safe_open(file, "pt", device=device)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - corrupt files must not end in a traceback
        raise InputError(file, None, f"cannot read weights ({type(err).__name__}: {err})") from None


def load_lazily(ref: str, device: str = "cpu") -> Checkpoint:
    """`ref` with its tensors read on access (LazyTensors); shapes and dtypes come from the safetensors headers
    (or a memory-mapped .bin), each file read once and no weight loaded."""
    path, config = read_config(ref)
    files, shapes, dtypes = {}, {}, {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            header = read_safetensors_header(file)
        else:
            header = {name: (tuple(t.shape), t.dtype) for name, t in _open_lazily(file, "cpu").items()}
        for name, (shape, dtype) in header.items():
            files[name], shapes[name], dtypes[name] = file, shape, dtype
    if not files:
        raise InputError(ref, None, "the checkpoint holds no tensors")
    adapter_ref = split_lora(ref)[1]
    adapter = None if adapter_ref is None else read_adapter(adapter_ref)
    if adapter is not None:
        check_targets(shapes, adapter, ref)
    tensors = LazyTensors(files, device, adapter)
    return Checkpoint(ref=ref, path=path, config=config, shapes=shapes, dtypes=dtypes, tensors=tensors)


def load_checkpoint(ref: str, device: str = "cpu", shard: Shard | None = None) -> Checkpoint:
    """Every tensor of `ref` on `device`; with `shard`, only that rank's part of each (merge_core/sharding.py),
    read from safetensors files as a slice, so a rank never holds a whole source. A `model+adapter` reference
    is the model with the LoRA adapter folded in (merge_core/lora.py)."""
    path, config = read_config(ref)
    adapter_ref = split_lora(ref)[1]
    if adapter_ref is not None and shard is not None:
        raise InputError(ref, None, "LoRA references cannot be tensor-parallel sharded yet: merge without shards")
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if shard is None:
            tensors.update(read_tensors(file, device))
        elif file.suffix == ".safetensors":
            tensors.update(read_shard(file, device, shard))
        else:
            tensors.update({name: shard.take(name, t) for name, t in read_tensors(file, device).items()})
    if not tensors:
        raise InputError(ref, None, "the checkpoint holds no tensors")
    if adapter_ref is not None:
        tensors = fold(tensors, read_adapter(adapter_ref), where=ref)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    return Checkpoint(ref=ref, path=path, config=config, shapes=shapes, dtypes=dtypes, tensors=tensors)


def check_compatible(checkpoints: Sequence[CheckpointInfo], same_vocabulary: bool = True) -> None:
    """Preflight: every source has the same tensor names and shapes, else name the first mismatch. With
    `same_vocabulary=False` (a tokenizer merge aligns them) the vocab size and the token axis may differ."""
    reference = checkpoints[0]
    if same_vocabulary:
        check_same_vocabulary(checkpoints)
    for other in checkpoints[1:]:
        missing = [name for name in reference.shapes if name not in other.shapes]
        extra = [name for name in other.shapes if name not in reference.shapes]
        if missing or extra:
            name, where = (missing[0], "lacks") if missing else (extra[0], "has an extra")
            raise InputError(other.ref, None, f"{where} tensor {name} compared with {reference.ref}")
        for name, shape in reference.shapes.items():
            if not _shapes_agree(name, other.shapes[name], shape, same_vocabulary):
                raise InputError(
                    other.ref, None, f"tensor {name} has shape {other.shapes[name]}, {reference.ref} has {shape}"
                )


def check_same_vocabulary(checkpoints: Sequence[CheckpointInfo]) -> None:
    """Without a tokenizer setting the merge reads every model's rows as they are: their vocabularies must agree."""
    reference = checkpoints[0]
    for other in checkpoints[1:]:
        if other.vocab_size != reference.vocab_size:
            raise InputError(
                other.ref,
                None,
                f"vocab_size {other.vocab_size} differs from {reference.ref}'s {reference.vocab_size} "
                "(set tokenizer_source: base, union or a model to merge differing vocabularies)",
            )


def _shapes_agree(name: str, shape: tuple[int, ...], other: tuple[int, ...], same_vocabulary: bool) -> bool:
    """Equal shapes; or, for a token-indexed tensor when vocabularies may differ, equal but along that axis."""
    axis = None if same_vocabulary else vocabulary_axis(name)
    if axis is None or len(shape) != len(other) or axis >= len(shape):
        return shape == other
    return shape[:axis] + shape[axis + 1 :] == other[:axis] + other[axis + 1 :]
