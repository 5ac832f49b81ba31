"""The converter's output format: an Orbax checkpoint of the weights plus our config and a manifest.

    DIR/longmamba_config.json   {"format": ..., "format_version": 1, "dtype": ..., "config": {...},
                                "checksums": {"layers/mixer/A_log": ..., ...},
                                "files": {"params/...": {"bytes": ..., "crc32": ...}, ...}}
    DIR/params/                 Orbax (StandardCheckpointer) checkpoint of `Params.weights`
    DIR/manifest.json           where the weights came from (source, revision, sha256 of the
                                input files, dtype, library version, config fingerprint, ...)

`longmamba_config.json` is written last, so a directory without it is never mistaken for a
complete conversion (`longmamba_jax.load` dispatches on it). On load every file of params/ is
checked against its size and CRC32 before Orbax reads it, and each restored parameter against
its checksum (a position-weighted sum of its bits mod 2^32) and for NaN / inf
(docs/reliability.md, "What is refused"). Directories written before these were recorded load
without them. Writers get all-or-nothing output from `atomic.atomic_directory`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from pathlib import Path, PurePosixPath

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_jax.checkpoints.atomic import (  # noqa: F401 - re-exported
    atomic_directory,
    check_output_dir,
    lock_path,
)
from longmamba_jax.checkpoints.files import CheckpointError, read_json
from longmamba_jax.checkpoints.torch_format import expected_shapes
from longmamba_jax.config import ConfigError, from_dict

CONVERTED_CONFIG = "longmamba_config.json"
PARAMS_DIR = "params"
MANIFEST = "manifest.json"
FORMAT = "longmamba-jax-converted"
FORMAT_VERSION = 1
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---------------------------------------------------------------------------------------------
# Writing.

def save_converted(params, out_dir, *, manifest: dict) -> Path:
    """Writes `params` as a converted checkpoint into `out_dir`.

    Args:
      params: `Params` (weights + config).
      out_dir: a directory that does not exist yet or is empty. For all-or-nothing output, pass
        the temporary directory of `atomic_directory`.
      manifest: JSON-able provenance (source, revision, input sha256s, ...); `format_version`,
        `dtype` and `config_fingerprint` are added.

    Returns:
      The output directory.
    """
    from longmamba_jax.quantization import refuse_quantized

    refuse_quantized(params, "saving a converted checkpoint")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = params.config
    dtype = str(np.dtype(params.dtype))
    with _checkpointer(params.weights) as checkpointer:
        checkpointer.save(out_dir / PARAMS_DIR, params.weights)
    write_manifest(out_dir, {**manifest, "format_version": FORMAT_VERSION, "dtype": dtype,
                             "config_fingerprint": config.fingerprint})
    checksums = {name: total for name, (total, _) in _checksums(params.weights).items()}
    files = {}
    for path in sorted((out_dir / PARAMS_DIR).rglob("*")):
        if path.is_file():
            files[path.relative_to(out_dir).as_posix()] = {"bytes": path.stat().st_size,
                                                           "crc32": _crc32(path)}
    _write_json(out_dir / CONVERTED_CONFIG, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "config": config.to_dict(),
        "checksums": checksums,
        "files": files,
    })
    return out_dir


def _crc32(path: Path, chunk: int = 1 << 23) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _checksum(a):
    """(Σ_i bits_i · (2i + 1) mod 2^32, all finite) of an fp32 / bf16 / fp16 array.

    Integer sums mod 2^32 do not depend on the order of the reduction, so the value is the same
    on every backend; the odd weights make any one flipped bit change it.
    """
    bits = jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])
    bits = bits.astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32), jnp.all(jnp.isfinite(a))


@jax.jit
def _checksum_tree(tree):
    """`_checksum` of every leaf, in one compiled program per model."""
    return jax.tree.map(_checksum, tree)


def _checksums(weights) -> dict[str, tuple[int, bool]]:
    """Parameter name -> (checksum, all finite), computed on the arrays' device."""
    sums = jax.device_get(_checksum_tree(jax.tree.map(jnp.asarray, weights)))
    return {"/".join(path): (int(total), bool(finite))
            for path, (total, finite) in _flat(sums)}


def write_manifest(directory, manifest: dict) -> None:
    """(Re)writes `directory/manifest.json` (e.g. to add the verification result)."""
    _write_json(Path(directory) / MANIFEST, manifest)


def _checkpointer(tree):
    """A StandardCheckpointer that moves about one large array at a time.

    Orbax copies each array to host memory while writing it (and stages each array while
    reading it), so unbounded concurrency holds a second copy of the whole model (≈ 2× the
    weights at mamba2-1.3b's size). Its limiter refuses a single request above the limit, so
    the limit is the largest array, rounded up to whole GB.
    """
    import orbax.checkpoint as ocp

    largest = max((leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)),
                  default=0)
    limit_gb = max(1, math.ceil(largest / 1e9))
    return ocp.StandardCheckpointer(save_concurrent_gb=limit_gb, restore_concurrent_gb=limit_gb)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading.

def read_converted_config(directory):
    """(config, stored dtype) from `directory/longmamba_config.json`."""
    config, dtype, _, _ = _read_converted(directory)
    return config, dtype


def _read_converted(directory):
    """(config, stored dtype, checksums or None, files or None) from
    `directory/longmamba_config.json`, each field checked."""
    directory = Path(directory)
    path = directory / CONVERTED_CONFIG
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if not path.exists():
        raise CheckpointError(f"{directory}: not a converted checkpoint (no {CONVERTED_CONFIG})")
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a longmamba-jax converted config "
                              f"(expected \"format\": {FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this "
                              f"version of longmamba-jax reads {FORMAT_VERSION})")
    try:
        config = from_dict(raw.get("config"), source=f"{path} (config)")
        _check_field_types(config)
    except (ConfigError, TypeError, ValueError, OverflowError) as exc:
        msg = str(exc)
        raise CheckpointError(msg if str(path) in msg else f"{path}: {msg}") from None
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{path}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    try:
        shapes = expected_shapes(config)
    except Exception as exc:  # noqa: BLE001 - e.g. sizes too large for the array library
        raise CheckpointError(f"{path}: the config implies impossible parameter shapes "
                              f"({type(exc).__name__}: {exc})") from None
    checksums = raw.get("checksums")  # absent in files written before checksums were recorded
    if checksums is not None:
        names = {"/".join(p) for p in shapes}
        if not isinstance(checksums, dict) or set(checksums) != names or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32
                for v in checksums.values()):
            raise CheckpointError(f"{path}: \"checksums\" must map each parameter of the config "
                                  "to an int in [0, 2^32)")
    files = raw.get("files")  # absent in files written before file checksums were recorded
    if files is not None:
        def ok(name, entry):
            parts = PurePosixPath(name).parts if isinstance(name, str) else ()
            return (len(parts) > 1 and parts[0] == PARAMS_DIR and ".." not in parts
                    and isinstance(entry, dict) and set(entry) == {"bytes", "crc32"}
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                            for v in entry.values()))

        if not isinstance(files, dict) or not files or not all(ok(*kv) for kv in files.items()):
            raise CheckpointError(f"{path}: \"files\" must map files under {PARAMS_DIR}/ to "
                                  "{\"bytes\": int, \"crc32\": int}")
    return config, np.dtype(_DTYPES[dtype]), checksums, files


def _check_field_types(config) -> None:
    """Every config field has its declared type (our own schema is read with no casts)."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), str(field.type)
        if kind.startswith("bool"):
            good = isinstance(value, bool)
        elif kind.startswith("int"):
            good = (isinstance(value, int) and not isinstance(value, bool)) or \
                ("None" in kind and value is None)
        elif kind.startswith("float"):
            good = (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0) or ("None" in kind and value is None)
        elif kind == "str":  # the hybrids' layer_pattern, hidden_act (checked by the config)
            good = isinstance(value, str)
        else:  # dt_limit: already (float, float) with low <= high
            good = all(isinstance(v, (int, float)) and not math.isnan(v) for v in value)
        if not good:
            raise ConfigError(f"config field {field.name} must be {kind}, got {value!r}")


def _check_files(directory: Path, files: dict) -> None:
    """Each listed file exists with its recorded size and CRC32 (before Orbax reads any)."""
    for name, entry in files.items():
        path = directory / name
        if not path.is_file() or path.is_symlink():
            raise CheckpointError(f"{path}: missing (listed in {CONVERTED_CONFIG})")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, but {CONVERTED_CONFIG} "
                                  f"records {entry['bytes']} (truncated or changed)")
    for name, entry in files.items():
        if _crc32(directory / name) != entry["crc32"]:
            raise CheckpointError(f"{directory / name}: does not match its CRC32 in "
                                  f"{CONVERTED_CONFIG} (the file is damaged or was changed)")


def load_converted(directory, dtype=None):
    """Loads the output of `save_converted` / `python -m convert` as `Params`.

    Args:
      directory: the converted checkpoint directory.
      dtype: None keeps the stored dtype; jnp.float32 / jnp.bfloat16 casts while restoring.

    Raises:
      FileNotFoundError: `directory` does not exist.
      CheckpointError: the directory is incomplete or corrupt (the message names the file).
    """
    from longmamba_jax.model import Params

    directory = Path(directory).absolute()
    config, stored, checksums, files = _read_converted(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: missing the weights directory {PARAMS_DIR}/")
    if files is not None:
        _check_files(directory, files)
    wanted_dtype = np.dtype(dtype) if dtype is not None else stored
    # Checksums are of the stored values: restore those, check, then cast.
    target_dtype = stored if checksums is not None else wanted_dtype
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for path, shape in expected_shapes(config).items():
        node = target
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, target_dtype, sharding=sharding)
    try:
        with _checkpointer(target) as checkpointer:
            _check_stored_shapes(checkpointer, params_dir, target)
            weights = checkpointer.restore(params_dir, target)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - Orbax/tensorstore raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{params_dir}: cannot restore the weights (corrupt, incomplete, or not written for "
            f"the config in {CONVERTED_CONFIG}): {first}"
        ) from None
    weights = _plain_dicts(weights)
    for name, (total, finite) in _checksums(weights).items():
        if checksums is not None and int(total) != checksums[name]:
            raise CheckpointError(f"{params_dir}: parameter {name} does not match its checksum in "
                                  f"{CONVERTED_CONFIG} (the files were changed or damaged)")
        if not bool(finite):
            raise CheckpointError(f"{params_dir}: parameter {name} holds NaN or inf values")
    if wanted_dtype != target_dtype:
        for path, _ in list(_flat(weights)):  # in place: one stored-dtype leaf freed at a time
            node = weights
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = node[path[-1]].astype(wanted_dtype)
    return Params(weights, config)


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, prefix + (key,))
    else:
        yield prefix, tree


def _check_stored_shapes(checkpointer, params_dir: Path, target: dict) -> None:
    """Compares the stored array metadata with what the config implies, naming the parameter.

    Orbax reports the same problem as an opaque error from inside an async restore; this says
    which parameter and leaves nothing running. Metadata that cannot be read is left to the
    restore to report.
    """
    try:
        meta = checkpointer.metadata(params_dir)
        meta = getattr(meta, "item_metadata", meta)  # orbax >= 0.12: StepMetadata
        meta = getattr(meta, "tree", meta)  # TreeMetadata
        stored = {path: tuple(leaf.shape) for path, leaf in _flat(dict(meta))}
    except Exception:  # noqa: BLE001 - any metadata problem: let restore report it
        return
    wanted = {path: tuple(leaf.shape) for path, leaf in _flat(target)}
    for path, shape in wanted.items():
        name = "/".join(path)
        if path not in stored:
            raise CheckpointError(f"{params_dir}: parameter {name} is missing")
        if stored[path] != shape:
            raise CheckpointError(f"{params_dir}: parameter {name} has shape {stored[path]} but "
                                  f"the config in {CONVERTED_CONFIG} implies {shape}")
    extra = sorted("/".join(p) for p in set(stored) - set(wanted))
    if extra:
        raise CheckpointError(f"{params_dir}: unexpected parameter {extra[0]} for the config in "
                              f"{CONVERTED_CONFIG}")


def _plain_dicts(tree):
    if isinstance(tree, dict):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree
