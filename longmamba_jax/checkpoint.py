"""Reading PyTorch Mamba checkpoints (mamba_ssm native and transformers layouts) into `Params`.

A checkpoint directory holds `config.json` and weights as `model.safetensors`, sharded
`*.safetensors` with `model.safetensors.index.json`, or `pytorch_model.bin` (read with
`torch.load(weights_only=True)` only: a pickle that carries code or objects is refused).

Conversion is a table (`_RULES`): torch key pattern -> parameter path and transform. Loading is
strict: every tensor must be used, every parameter filled, every shape match the config; each
failure is one `CheckpointError` naming the file and the key. Tensors are streamed one at a time
into preallocated arrays of the target dtype (no second full copy in fp32).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from longmamba_jax.config import Config, ConfigError, Mamba2Config, from_dict

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# Reading tensors.

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


# ---------------------------------------------------------------------------------------------
# The key table.

def _t(a):  # torch Linear weight [out, in] -> kernel [in, out]
    return a.T


def _conv(a):  # torch depthwise Conv1d weight [c, 1, k] -> kernel [k, c]
    if a.ndim != 3 or a.shape[1] != 1:
        raise ValueError(f"expected a depthwise conv weight [channels, 1, width], got {a.shape}")
    return a[:, 0, :].T


_same: Callable = lambda a: a

# (pattern, parameter path, transform); `{i}` marks a layer index. Native and transformers
# names differ only in `embedding` vs `embeddings`.
_LAYER = r"backbone\.layers\.(\d+)\."
_RULES_COMMON = [
    (r"backbone\.embeddings?\.weight", ("embedding", "weight"), _same),
    (r"backbone\.norm_f\.weight", ("norm_f", "weight"), _same),
    (r"lm_head\.weight", ("lm_head", "kernel"), _t),
    (_LAYER + r"norm\.weight", ("layers", "norm", "weight"), _same),
    (_LAYER + r"mixer\.in_proj\.weight", ("layers", "mixer", "in_proj", "kernel"), _t),
    (_LAYER + r"mixer\.in_proj\.bias", ("layers", "mixer", "in_proj", "bias"), _same),
    (_LAYER + r"mixer\.conv1d\.weight", ("layers", "mixer", "conv1d", "kernel"), _conv),
    (_LAYER + r"mixer\.conv1d\.bias", ("layers", "mixer", "conv1d", "bias"), _same),
    (_LAYER + r"mixer\.out_proj\.weight", ("layers", "mixer", "out_proj", "kernel"), _t),
    (_LAYER + r"mixer\.out_proj\.bias", ("layers", "mixer", "out_proj", "bias"), _same),
    (_LAYER + r"mixer\.A_log", ("layers", "mixer", "A_log"), _same),
    (_LAYER + r"mixer\.D", ("layers", "mixer", "D"), _same),
]
_RULES_MAMBA1 = _RULES_COMMON + [
    (_LAYER + r"mixer\.x_proj\.weight", ("layers", "mixer", "x_proj", "kernel"), _t),
    (_LAYER + r"mixer\.dt_proj\.weight", ("layers", "mixer", "dt_proj", "kernel"), _t),
    (_LAYER + r"mixer\.dt_proj\.bias", ("layers", "mixer", "dt_proj", "bias"), _same),
]
_RULES_MAMBA2 = _RULES_COMMON + [
    (_LAYER + r"mixer\.dt_bias", ("layers", "mixer", "dt_bias"), _same),
    (_LAYER + r"mixer\.norm\.weight", ("layers", "mixer", "norm", "weight"), _same),
]


def _match(rules, key: str):
    for pattern, path, transform in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return path, (int(m.group(1)) if m.groups() else None), transform
    return None


def torch_key(path: tuple[str, ...], layer: int | None, native: bool) -> str:
    """The torch key a parameter comes from (for messages and for export)."""
    names = {
        ("embedding", "weight"): "backbone.embedding.weight" if native
        else "backbone.embeddings.weight",
        ("norm_f", "weight"): "backbone.norm_f.weight",
        ("lm_head", "kernel"): "lm_head.weight",
    }
    if path in names:
        return names[path]
    leaf = ".".join(p.replace("kernel", "weight") for p in path[1:])
    return f"backbone.layers.{layer}.{leaf}"


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def expected_shapes(config: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path -> shape, from the model definition itself."""
    from longmamba_jax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(config).weights)
    return {path: tuple(leaf.shape) for path, leaf in _flatten(shapes)}


def load_torch_checkpoint(directory, dtype=None, *, progress: bool = False):
    """Loads a torch checkpoint directory (either layout) into `Params`.

    Args:
      directory: holds config.json and the weights.
      dtype: parameter dtype (jnp.float32 / jnp.bfloat16); None keeps the checkpoint's dtype
        (fp32 when it mixes dtypes).
      progress: show a progress bar over tensors.

    Returns:
      (Params, info) where info has the schema ("native" / "transformers"), files and dtype.
    """
    from longmamba_jax.model import Params

    directory = Path(directory)
    config, schema = read_config(directory)
    files = weight_files(directory)
    native = schema == "native"
    rules = _RULES_MAMBA2 if isinstance(config, Mamba2Config) else _RULES_MAMBA1
    shapes = expected_shapes(config)
    n_layer = config.n_layer
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}  # per path: bool [n_layer] or [1]
    seen_dtypes = set()
    lm_head_tied = None
    bar = _progress(progress, files)
    try:
        for path_file, key, array in iter_tensors(files):
            bar.update(1)
            hit = _match(rules, key)
            if hit is None:
                raise CheckpointError(f"{path_file}: unexpected key {key!r} (not part of a "
                                      f"{config.arch} model in the {schema} layout)")
            path, layer, transform = hit
            if path == ("lm_head", "kernel") and config.tie_embeddings:
                lm_head_tied = (path_file, array)  # mamba_ssm saves tied heads too; checked below
                continue
            if path not in shapes:
                raise CheckpointError(f"{path_file}: unexpected key {key!r} for this config "
                                      f"(e.g. a bias the config does not have)")
            want = shapes[path]
            if layer is not None:
                if layer >= n_layer:
                    raise CheckpointError(f"{path_file}: key {key!r} is for layer {layer} but the "
                                          f"config has n_layer={n_layer}")
                want_one = want[1:]
            else:
                want_one = want
            try:
                value = transform(array)
            except ValueError as exc:
                raise CheckpointError(f"{path_file}: key {key!r}: {exc}") from None
            if tuple(value.shape) != want_one:
                raise CheckpointError(
                    f"{path_file}: key {key!r} has shape {tuple(array.shape)}, but the config "
                    f"({directory / CONFIG_FILE}) implies {_torch_shape(path, want_one)}"
                )
            seen_dtypes.add(np.dtype(array.dtype))
            target = np.dtype(dtype) if dtype is not None else None
            if path not in buffers:
                buf_dtype = target or np.dtype(array.dtype)
                buffers[path] = np.empty(want, buf_dtype)
                filled[path] = np.zeros((n_layer if layer is not None else 1,), bool)
            slot = layer if layer is not None else 0
            if filled[path][slot]:
                raise CheckpointError(f"{path_file}: key {key!r} appears twice")
            if layer is not None:
                buffers[path][layer] = value.astype(buffers[path].dtype, copy=False)
            else:
                buffers[path][...] = value.astype(buffers[path].dtype, copy=False)
            filled[path][slot] = True
    finally:
        bar.close()
    missing = []
    for path in shapes:
        if path not in filled:
            layers = [0] if path[0] == "layers" else [None]
        else:
            layers = [i for i, ok in enumerate(filled[path]) if not ok]
            if path[0] != "layers":
                layers = [None] if layers else []
        missing += [torch_key(path, i, native) for i in layers]
    if missing:
        raise CheckpointError(
            f"{directory}: missing key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if lm_head_tied is not None:
        head_file, head = lm_head_tied
        if head.shape != buffers[("embedding", "weight")].shape or not np.array_equal(
            np.asarray(head, np.float32), np.asarray(buffers[("embedding", "weight")], np.float32)
        ):
            raise CheckpointError(
                f"{head_file}: key 'lm_head.weight' differs from the embedding but the config "
                "ties them (tie_embeddings / tie_word_embeddings)"
            )
    if dtype is None and len({d for d in seen_dtypes}) > 1:
        buffers = {p: b.astype(np.float32) for p, b in buffers.items()}
    weights: dict = {}
    for path in list(buffers):
        _set(weights, path, jnp.asarray(buffers.pop(path)))
    out_dtype = weights["embedding"]["weight"].dtype
    info = {"schema": schema, "files": [str(f) for f in files], "dtype": str(out_dtype)}
    return Params(weights, config), info


def _torch_shape(path, shape):
    if path[-1] == "kernel" and path[-2] == "conv1d":
        return (shape[1], 1, shape[0])
    if path[-1] == "kernel":
        return tuple(reversed(shape))
    return shape


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, files):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

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
    return tqdm(total=total, desc="tensors", unit="tensor")


# ---------------------------------------------------------------------------------------------
# Configs and sources.

def read_json(path: Path):
    """Parses a JSON file; a malformed one raises CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_config(directory: Path) -> tuple[Config, str]:
    """(config, schema) from `directory/config.json`; schema is "native" or "transformers"."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}")
    raw = read_json(path)
    try:
        config = from_dict(raw, source=str(path))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(str(exc)) from None
    schema = "transformers" if "model_type" in raw else "native" if "d_model" in raw else "ours"
    return config, schema


HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "*.json"]


def resolve_source(source, *, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub (cache and
    HF_HUB_OFFLINE respected). Raises FileNotFoundError with what to do when offline."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: is a file; pass the checkpoint directory")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such directory (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), revision=revision,
                                      allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached "
            "(offline: HF_HUB_OFFLINE is set or there is no network). Download it elsewhere, "
            "or pass a local directory holding config.json and the weights."
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise FileNotFoundError(f"{source}: cannot fetch from the hub: {exc}") from None
