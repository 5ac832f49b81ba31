"""Reading tensors from checkpoint files: safetensors (memory-mapped, every header field and
byte range checked), torch `.bin` through `torch.load(weights_only=True)` only, and the weight
files of a checkpoint directory. Every failure is a `CheckpointError` naming the file and key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from longmamba_jax.progress import NoBar
from longmamba_jax.progress import progress_bar as tqdm_bar

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the key."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) from a .safetensors file, memory-mapped (nothing copied up front).

    Validates the header and every tensor's byte range, so truncated or corrupt files fail with
    a message naming the file (and the key) instead of garbage or a segfault.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        header_len = int.from_bytes(raw, "little")
        if header_len <= 0 or 8 + header_len > size or header_len > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header length {header_len}, file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) \
        if data_len > 0 else np.zeros((0,), np.uint8)
    for key, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for key {key!r}: {info!r}") \
                from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {key!r} needs bytes {begin}..{end} of the data "
                f"section but the file holds {data_len}"
            )
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors entry {key!r}: {end - begin} bytes for shape "
                f"{shape} of {info['dtype']}"
            )
        yield key, mm[begin:end].view(dtype).reshape(shape)


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) from a torch `.bin` state dict via `torch.load(weights_only=True)`.

    The restricted unpickler refuses any pickle that carries code or arbitrary objects; nothing
    in such a file runs. bf16 tensors come out as ml_dtypes.bfloat16 arrays.
    """
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading a .bin checkpoint needs torch (pip install torch); prefer "
            ".safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a plain state dict"
        if "weights_only" in str(exc) or "Unsupported" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the pickle holds objects or code, not just tensors "
                f"(torch.load weights_only=True said: {str(exc).splitlines()[0]})"
            ) from None
        raise CheckpointError(f"{path}: cannot read torch checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, "
                                  "not a tensor")
        if tensor.dtype == torch.bfloat16:
            array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            array = tensor.numpy()
        yield key, array


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the preferred format."""
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: corrupt shard index ({exc})") from None
        files = sorted({directory / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name} which is missing")
        return files
    single = directory / SAFETENSORS_FILE
    if single.exists():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    if (directory / BIN_FILE).exists():
        return [directory / BIN_FILE]
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise CheckpointError(
        f"{directory}: no weights found (model.safetensors, *.safetensors with "
        f"{SAFETENSORS_INDEX}, or {BIN_FILE})"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, np.ndarray]]:
    for path in files:
        reader = read_torch_bin if path.suffix == ".bin" else read_safetensors
        for key, array in reader(path):
            yield path, key, array


def progress_bar(enabled: bool, files):
    """A tqdm bar over the tensors of `files` (a no-op object when not enabled)."""
    if not enabled:
        return NoBar()
    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    total += len([k for k in json.loads(fh.read(n)) if k != "__metadata__"])
            except (OSError, ValueError):
                total = None
                break
        else:
            total = None
            break
    return tqdm_bar(total=total, desc="tensors", unit="tensor")


def read_json(path: Path):
    """Parses a JSON file; a malformed one raises CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None

