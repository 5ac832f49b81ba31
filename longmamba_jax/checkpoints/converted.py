"""The converter's output format: an Orbax checkpoint of the weights plus our config and a manifest.

    DIR/longmamba_config.json   {"format": ..., "format_version": 1, "dtype": ..., "config": {...},
                                "checksums": {"layers/mixer/A_log": ..., ...}}
    DIR/params/                 Orbax (StandardCheckpointer) checkpoint of `Params.weights`
    DIR/manifest.json           where the weights came from (source, revision, sha256 of the
                                input files, dtype, library version, config fingerprint, ...)

`longmamba_config.json` is written last, so a directory without it is never mistaken for a
complete conversion (`longmamba_jax.load` dispatches on it). Its checksums (a position-weighted
sum of each parameter's bits, mod 2^32, so any single flipped bit changes it) are checked on
load, with every value finite (docs/reliability.md, "What is refused"). `atomic_directory`
gives writers an all-or-nothing output directory: everything is written into a temporary
directory beside the target and renamed into place only when the writer finished without error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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
    checksums = {"/".join(path): int(_checksum(jnp.asarray(leaf))[0])
                 for path, leaf in _flat(params.weights)}
    _write_json(out_dir / CONVERTED_CONFIG, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "config": config.to_dict(),
        "checksums": checksums,
    })
    return out_dir


@jax.jit
def _checksum(a):
    """(Σ_i bits_i · (2i + 1) mod 2^32, all finite) of an fp32 / bf16 / fp16 array.

    Integer sums mod 2^32 do not depend on the order of the reduction, so the value is the same
    on every backend; the odd weights make any one flipped bit change it.
    """
    bits = jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])
    bits = bits.astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32), jnp.all(jnp.isfinite(a))


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
    config, dtype, _ = _read_converted(directory)
    return config, dtype


def _read_converted(directory):
    """(config, stored dtype, checksums or None) from `directory/longmamba_config.json`."""
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
    except (ConfigError, TypeError) as exc:
        msg = str(exc)
        raise CheckpointError(msg if str(path) in msg else f"{path}: {msg}") from None
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{path}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    checksums = raw.get("checksums")  # absent in files written before checksums were recorded
    if checksums is not None:
        names = {"/".join(p) for p in expected_shapes(config)}
        if not isinstance(checksums, dict) or set(checksums) != names or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32
                for v in checksums.values()):
            raise CheckpointError(f"{path}: \"checksums\" must map each parameter of the config "
                                  "to an int in [0, 2^32)")
    return config, np.dtype(_DTYPES[dtype]), checksums


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
    config, stored, checksums = _read_converted(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: missing the weights directory {PARAMS_DIR}/")
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
    for path, leaf in _flat(weights):
        name = "/".join(path)
        total, finite = _checksum(leaf)
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


# ---------------------------------------------------------------------------------------------
# All-or-nothing output directories (docs/reliability.md, "Output directories").

# What our writers put in an output directory: a conversion, or an export (export.py).
_OUTPUT_NAMES = frozenset({CONVERTED_CONFIG, PARAMS_DIR, MANIFEST, "config.json",
                           "model.safetensors", "pytorch_model.bin"})


def _replaceable(path: Path) -> bool:
    """Whether --force may replace `path`: an empty directory, or one holding only what a
    conversion or an export writes (a file of the user's in it makes it not replaceable)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or (names <= _OUTPUT_NAMES
                         and bool(names & {CONVERTED_CONFIG, "config.json"}))


def check_output_dir(out, *, force: bool = False) -> None:
    """Raises FileExistsError unless `out` is free, or `force` and `out` may be replaced."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out}: already exists (pass --force / force=True to replace "
                                  "it)")
        if not _replaceable(out):
            raise FileExistsError(
                f"{out}: exists and is not an empty directory or a previous conversion; refusing "
                "to replace it even with --force"
            )


def _temp_pattern(out: Path, kind: str) -> re.Pattern:
    """`.NAME.tmp-PID-XXXXXXXX` (mkdtemp's 8 random characters) or `.NAME.old-PID-XXXXXXXX`."""
    return re.compile(rf"\.{re.escape(out.name)}\.{kind}-(\d+)-[a-z0-9_]{{8}}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid we can ask about): keep its files
    return True


def _clean_stale(out: Path) -> None:
    """Removes what writers to `out` that died (SIGKILL, power loss) left beside it.

    Only our own names with the pid of a process that no longer runs on this machine: their
    temporary directories are removed; a previous output they had moved aside is moved back
    when `out` is missing (they died between the two renames of a --force commit), else
    removed (they died after committing, while deleting it). Called with the lock held.
    """
    tmp_re, old_re = _temp_pattern(out, "tmp"), _temp_pattern(out, "old")
    for path in sorted(out.parent.iterdir()):
        m = tmp_re.fullmatch(path.name) or old_re.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_dir() or _alive(int(m.group(1))):
            continue
        if tmp_re.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif not (out.exists() or out.is_symlink()):
            os.rename(path, out)
        elif _replaceable(path):
            shutil.rmtree(path, ignore_errors=True)


def lock_path(out) -> Path:
    """The lock file of an output directory: `.NAME.lock` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `out`: flock on `.NAME.lock` beside it (released by the kernel if
    the holder dies, so a killed writer never leaves a stale lock)."""
    import fcntl

    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(
                f"{out}: another conversion or export is writing it right now (it holds "
                f"{path}); wait for it to finish or choose another output directory"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: the next writer then locks a new file
        os.close(fd)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Renames the finished `tmp` to `out`, checking `out` again now (it may have appeared or
    changed since the start): anything not replaceable is left untouched."""
    untouched = "it was left untouched and the new output was not written"
    if not (out.exists() or out.is_symlink()):
        try:
            os.rename(tmp, out)  # fails on a non-empty directory or a file put there meanwhile
        except OSError as exc:
            raise FileExistsError(f"{out}: appeared during the run ({exc.strerror}); "
                                  f"{untouched}") from None
        return
    if not force:
        raise FileExistsError(f"{out}: appeared during the run; {untouched} (pass --force to "
                              "replace a previous conversion)")
    if not _replaceable(out):
        raise FileExistsError(f"{out}: is no longer an empty directory or a previous conversion "
                              f"(it changed during the run); {untouched}")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    if not _replaceable(old):  # changed between the check and the rename
        try:
            os.rename(old, out)
        except OSError:
            raise FileExistsError(f"{out}: changed during the run; it is now at {old}, and the "
                                  "new output was not written") from None
        raise FileExistsError(f"{out}: changed during the run; {untouched}")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out, *, force: bool = False,
                     on_commit: Callable[[], contextlib.AbstractContextManager] | None = None,
                     ) -> Iterator[Path]:
    """Yields a temporary directory beside `out`; on success it becomes `out`.

    One writer at a time: an exclusive lock beside `out` is held from the start to the end
    (a second writer gets FileExistsError at once). On any exception (including
    KeyboardInterrupt) the temporary directory is removed and `out` is left exactly as it was.
    An existing `out` is refused unless `force`, and then replaced only after the writer
    succeeded, and only if it still is an empty directory or a previous conversion / export
    (never an arbitrary directory or a file, nor one that changed meanwhile). Temporary
    directories of earlier writers to `out` that were killed are removed first.

    `on_commit`, if given, makes a context manager entered around the final renames (the
    converter defers a second signal there).

    Raises:
      FileExistsError: `out` exists and `force` is off, cannot be replaced safely, appeared or
        changed during the run, or another writer holds it.
    """
    out = Path(out).absolute()
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _output_lock(out):
            _clean_stale(out)
            check_output_dir(out, force=force)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-",
                                        dir=out.parent))
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is not
                yield tmp
                with on_commit() if on_commit is not None else contextlib.nullcontext():
                    _commit(tmp, out, force)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
