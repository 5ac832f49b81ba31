"""Reading PyTorch checkpoints (mamba_ssm native, transformers, and Codestral Mamba's own
release) into `Params`.

A checkpoint directory holds `config.json` and weights as `model.safetensors`, sharded
`*.safetensors` with `model.safetensors.index.json`, or `pytorch_model.bin` (read with
`torch.load(weights_only=True)` only: a pickle that carries code or objects is refused); a
Codestral Mamba release holds `params.json` and `consolidated.safetensors` (mamba_ssm's keys
under `model.`). Hybrid families (Zamba2, Bamba) come in the transformers layout.

Conversion is a table (`_RULES`; `hybrid.checkpoint.HybridKeys` for the hybrid families):
torch key pattern -> parameter path and transform. Loading is strict: every tensor must be used,
every parameter filled, every shape match the config, every value be a finite float; each
failure is one `CheckpointError` naming the file and the key. Tensors are streamed one at a time
into preallocated arrays of the target dtype (no second full copy in fp32).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from longmamba_jax.checkpoints.files import (
    CONFIG_FILE,
    CheckpointError,
    iter_tensors,
    progress_bar,
    read_json,
    weight_files,
)
from longmamba_jax.config import (
    Config,
    ConfigError,
    Mamba2Config,
    MambaConfig,
    from_dict,
    from_mistral_params,
)

MISTRAL_CONFIG = "params.json"  # Codestral Mamba's own release (mistral-inference)
MISTRAL_WEIGHTS = "consolidated.safetensors"

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


_TRANSFORMS = {"linear": _t, "conv": _conv, "same": _same}
_UNSTACKED = ("embedding", "norm_f", "lm_head")  # every other top-level group is stacked


class _PureKeys:
    """The key table of a Mamba / Mamba2 model in one layout: `match(key)` -> (path, layer,
    transform, is_copy) or None; `torch_key(path, layer)`. Codestral's release ("mistral")
    holds the native keys under a `model.` prefix."""

    def __init__(self, config, schema: str):
        self.rules = _RULES_MAMBA2 if isinstance(config, Mamba2Config) else _RULES_MAMBA1
        self.native = schema in ("native", "mistral")
        self.prefix = "model." if schema == "mistral" else ""

    def match(self, key: str):
        if not key.startswith(self.prefix):
            return None
        hit = _match(self.rules, key[len(self.prefix):])
        return None if hit is None else (*hit, False)

    def torch_key(self, path, layer):
        return self.prefix + torch_key(path, layer, self.native)


def key_table(config, schema: str = "transformers"):
    """The key table of `config` in `schema`'s layout (hybrid families: transformers only)."""
    if isinstance(config, (MambaConfig, Mamba2Config)):
        return _PureKeys(config, schema)
    from longmamba_jax.hybrid.checkpoint import HybridKeys

    return HybridKeys(config)


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


def flatten(tree: dict, prefix: tuple[str, ...] = ()):
    """(path, leaf) of a nested dict, depth first in sorted key order."""
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def expected_shapes(config: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path -> shape, from the model definition itself."""
    from longmamba_jax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(config).weights)
    return {path: tuple(leaf.shape) for path, leaf in flatten(shapes)}


def load_torch_checkpoint(directory, dtype=None, *, progress: bool = False,
                          on_tensor: Callable[[], None] | None = None):
    """Loads a torch checkpoint directory (either layout) into `Params`.

    Args:
      directory: holds config.json and the weights.
      dtype: parameter dtype (jnp.float32 / jnp.bfloat16); None keeps the checkpoint's dtype
        (fp32 when it mixes dtypes).
      progress: show a progress bar over tensors.
      on_tensor: called after each tensor (the converter's safe point for signals).

    Returns:
      (Params, info) where info has the schema ("native" / "transformers"), files and dtype.
    """
    from longmamba_jax.model import Params

    directory = Path(directory)
    config, schema = read_config(directory)
    files = [directory / MISTRAL_WEIGHTS] if schema == "mistral" else weight_files(directory)
    if schema == "mistral" and not files[0].exists():
        raise CheckpointError(f"{directory}: {MISTRAL_CONFIG} without {MISTRAL_WEIGHTS}")
    table = key_table(config, schema)
    shapes = expected_shapes(config)
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}  # per path: bool [slots] or [1]
    copies = []  # tied copies (Zamba2's shared blocks), compared once everything is read
    seen_dtypes = set()
    lm_head_tied = None
    bar = progress_bar(progress, files)
    try:
        for path_file, key, array in iter_tensors(files):
            bar.update(1)
            if on_tensor is not None:
                on_tensor()
            hit = table.match(key)
            if hit is None:
                raise CheckpointError(f"{path_file}: unexpected key {key!r} (not part of a "
                                      f"{config.family} model in the {schema} layout)")
            path, layer, transform, copy = hit
            transform = _TRANSFORMS.get(transform, transform) if isinstance(transform, str) \
                else transform
            _check_values(path_file, key, array)
            if path == ("lm_head", "kernel") and config.tie_embeddings:
                lm_head_tied = (path_file, array)  # mamba_ssm saves tied heads too; checked below
                continue
            if path not in shapes:
                raise CheckpointError(f"{path_file}: unexpected key {key!r} for this config "
                                      f"(e.g. a bias the config does not have)")
            want = shapes[path]
            if layer is not None:
                if layer >= want[0]:
                    raise CheckpointError(f"{path_file}: key {key!r} is for layer {layer} but the "
                                          f"config has {want[0]} such layers")
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
            if copy:
                copies.append((path_file, key, path, layer, np.array(value, np.float32)))
                continue
            seen_dtypes.add(np.dtype(array.dtype))
            target = np.dtype(dtype) if dtype is not None else None
            if path not in buffers:
                buf_dtype = target or np.dtype(array.dtype)
                buffers[path] = np.empty(want, buf_dtype)
                filled[path] = np.zeros((want[0] if layer is not None else 1,), bool)
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
        stacked = path[0] not in _UNSTACKED
        if path not in filled:
            layers = [0] if stacked else [None]
        else:
            layers = [i for i, ok in enumerate(filled[path]) if not ok]
            if not stacked:
                layers = [None] if layers else []
        missing += [table.torch_key(path, i) for i in layers]
    if missing:
        raise CheckpointError(
            f"{directory}: missing key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for path_file, key, path, layer, value in copies:
        if not np.array_equal(value, np.asarray(buffers[path][layer], np.float32)):
            raise CheckpointError(f"{path_file}: key {key!r} differs from "
                                  f"{table.torch_key(path, layer)!r}, which the model ties it to")
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


_FLOAT_DTYPES = {np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}


def _check_values(path_file: Path, key: str, array: np.ndarray) -> None:
    """Every parameter is floating point and finite (one pass over the tensor)."""
    if np.dtype(array.dtype) not in _FLOAT_DTYPES:
        raise CheckpointError(f"{path_file}: key {key!r} is {array.dtype}, but every parameter is "
                              "floating point (float32, bfloat16, float16 or float64)")
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path_file}: key {key!r} holds NaN or inf values")


def _torch_shape(path, shape):
    if path[-1] == "kernel" and path[-2] == "conv1d":
        return (shape[1], 1, shape[0])
    if path[-1] == "kernel":
        return tuple(reversed(shape))
    return shape



def config_file(directory) -> Path:
    """The config file of a checkpoint directory: `config.json`, or `params.json` of a
    Codestral Mamba release (mistral-inference layout) that has no config.json."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() and (directory / MISTRAL_CONFIG).exists():
        return directory / MISTRAL_CONFIG
    return directory / CONFIG_FILE


def read_config(directory: Path) -> tuple[Config, str]:
    """(config, schema) from the directory's config file; schema is "native", "transformers",
    "mistral" (Codestral's params.json) or "ours"."""
    path = config_file(directory)
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}")
    raw = read_json(path)
    try:
        if path.name == MISTRAL_CONFIG:
            return from_mistral_params(raw, source=str(path)), "mistral"
        config = from_dict(raw, source=str(path))
    except (ConfigError, TypeError, ValueError, OverflowError) as exc:  # int("x"), int(inf)
        msg = str(exc)
        raise CheckpointError(msg if str(path) in msg else f"{path}: {msg}") from None
    schema = "transformers" if "model_type" in raw else "native" if "d_model" in raw else "ours"
    return config, schema

