"""Reading tensors from checkpoint files: safetensors (memory-mapped, every header field and
byte range checked), torch `.bin` through `torch.load(weights_only=True)` only, and the weight
files of a checkpoint directory. Every failure is a `CheckpointError` naming the file and key."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

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


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_safetensors_header(path: Path) -> tuple[dict, int, int]:
    """(header without `__metadata__`, data start offset, file size) of a .safetensors file.

    The header length (the first 8 bytes) is checked against the file size before anything
    else is read, so a corrupt length is one CheckpointError, never a huge allocation.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        header_len = int.from_bytes(raw, "little")
        if header_len < 2 or 8 + header_len > size or header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header length {header_len}, file size {size})")
        text = f.read(header_len)
    if len(text) != header_len:
        raise CheckpointError(f"{path}: truncated safetensors header (file changed while read)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + header_len, size


def _entry(path: Path, key: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """dtype, shape and byte range of one header entry, each field checked."""
    def bad(why: str):
        return CheckpointError(f"{path}: corrupt safetensors entry for key {key!r}: {why}")

    if not isinstance(info, dict):
        raise bad(f"{info!r} is not an object")
    name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(name, str) or name not in _ST_DTYPES:
        raise bad(f"dtype {name!r} is not one of {sorted(_ST_DTYPES)}")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in shape + offsets):
        raise bad(f"shape {shape!r} / data_offsets {offsets!r} are not lists of non-negative "
                  "integers")
    return np.dtype(_ST_DTYPES[name]), tuple(shape), offsets[0], offsets[1]


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) from a .safetensors file, memory-mapped (nothing copied up front).

    Validates the header and every tensor's byte range, so truncated or corrupt files fail with
    a message naming the file (and the key) instead of garbage or a segfault.
    """
    header, data_start, size = read_safetensors_header(path)
    data_len = size - data_start
    entries = {key: _entry(path, key, info) for key, info in header.items()}
    for key, (dtype, shape, begin, end) in entries.items():
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {key!r} needs bytes {begin}..{end} of the data "
                f"section but the file holds {data_len}"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: corrupt safetensors entry {key!r}: {end - begin} bytes for shape "
                f"{shape} of {header[key]['dtype']}"
            )
    # As the safetensors library requires: the tensors tile the data section exactly, so no
    # two of them share bytes and nothing is left over.
    position = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != position:
            raise CheckpointError(f"{path}: corrupt safetensors entry {key!r}: data_offsets "
                                  f"[{begin}, {end}] overlap another tensor or leave a gap")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: the tensors cover {position} bytes of the data section, "
                              f"but it holds {data_len} (trailing bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) \
        if data_len > 0 else np.zeros((0,), np.uint8)
    for key, (dtype, shape, begin, end) in entries.items():
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
    _check_zip_crcs(path)
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


def _check_zip_crcs(path: Path) -> None:
    """A torch `.bin` (a zip archive since torch 1.6) records each entry's CRC-32, which
    torch.load does not check: a flipped bit in a tensor's bytes would load as another value.
    One sequential read checks them all. Legacy (non-zip) files carry no checksums."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # noqa: BLE001 - any failure means a damaged archive
        raise CheckpointError(f"{path}: damaged zip archive ({type(exc).__name__}: "
                              f"{exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad!r} fails its CRC-32 check (the file is "
                              "damaged)")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the preferred format."""
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: corrupt shard index (\"weight_map\" must map tensor "
                                  "names to shard file names)")
        return [_shard(directory, index, name) for name in sorted(set(weight_map.values()))]
    single = directory / SAFETENSORS_FILE
    if single.exists():
        return [_regular(single)]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return [_regular(f) for f in shards]
    if (directory / BIN_FILE).exists():
        return [_regular(directory / BIN_FILE)]
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return [_regular(f) for f in bins]
    raise CheckpointError(
        f"{directory}: no weights found (model.safetensors, *.safetensors with "
        f"{SAFETENSORS_INDEX}, or {BIN_FILE})"
    )


def _regular(path: Path) -> Path:
    """`path` if it is a regular file (not a directory, FIFO or device, which could hang)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def _shard(directory: Path, index: Path, name: str) -> Path:
    """The shard `name` of the index, refused unless it lies inside the checkpoint directory.

    Absolute names, `..` and symlinks that resolve outside it are refused; in a Hugging Face
    cache snapshot (`.../snapshots/<rev>/`) the files are symlinks into the repository's
    `blobs/`, which is allowed.
    """
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name \
            or PureWindowsPath(name).drive:
        raise CheckpointError(f"{index}: names shard {name!r}, which is outside the checkpoint "
                              "directory")
    path = directory / pure
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{index}: names shard {name} which is missing")
    resolved = path.resolve()
    roots = [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    if not any(resolved.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{index}: shard {name} resolves to {resolved}, outside the "
                              "checkpoint directory")
    if not path.exists():
        raise CheckpointError(f"{index}: names shard {name} which is missing")
    return _regular(path)


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
        if f.suffix != ".safetensors":
            total = None
            break
        try:
            total += len(read_safetensors_header(f)[0])
        except (OSError, CheckpointError):
            total = None  # the reader reports the problem, naming the file
            break
    return tqdm_bar(total=total, desc="tensors", unit="tensor")


def read_json(path: Path):
    """Parses a JSON file; a malformed one raises CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None

