"""Argument checks shared by the calibration builder and artifact: each raises one ValueError
naming the argument and the value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_AGGREGATES = ("mean", "max")
_SLOWEST_STATE = ("max", "mean")
_STORAGES = ("auto", "exact", "grid")


def check_options(clamp_top, aggregate, slowest_state, storage, grid_step, fingerprint) -> None:
    if not (isinstance(clamp_top, (int, float)) and 0.0 <= float(clamp_top) <= 1.0):
        raise ValueError(f"clamp_top must be a number in [0, 1], got {clamp_top!r}")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    if slowest_state not in _SLOWEST_STATE:
        raise ValueError(f"slowest_state must be one of {_SLOWEST_STATE}, got {slowest_state!r}")
    if storage not in _STORAGES:
        raise ValueError(f"storage must be one of {_STORAGES}, got {storage!r}")
    if not (isinstance(grid_step, (int, float)) and 0.0 < float(grid_step) <= 1.0):
        raise ValueError(f"grid_step must be in (0, 1], got {grid_step!r}")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")


def check_A(A: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int], int]:
    """A as float64 arrays, the channel counts, and A's rank (1: Mamba2, 2: Mamba-1)."""
    out, channels, ranks = [], [], set()
    for i, a in enumerate(A):
        a = np.asarray(a, np.float64)
        if a.ndim not in (1, 2) or a.shape[0] == 0:
            raise ValueError(f"A[{i}] must be [channels] or [channels, d_state] with channels >= 1,"
                             f" got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"A[{i}] must be finite")
        out.append(a)
        channels.append(int(a.shape[0]))
        ranks.add(a.ndim)
    if len(ranks) != 1:
        raise ValueError("A mixes [channels] and [channels, d_state] layers")
    return out, channels, ranks.pop()


def check_deltas(deltas: Sequence[np.ndarray], A: Sequence[np.ndarray], train_len: int) -> int:
    """Validates one batch of Δ (list over layers of [windows, train_len, channels]) against A;
    returns the number of windows."""
    windows = None
    for i, (d, a) in enumerate(zip(deltas, A, strict=True)):
        d = np.asarray(d)
        a = np.asarray(a)
        if d.ndim != 3:
            raise ValueError(
                f"deltas[{i}] must be [windows, train_len, channels], got shape {d.shape}"
            )
        if d.shape[1] != train_len:
            raise ValueError(
                f"deltas[{i}] has length {d.shape[1]} on axis 1 but train_len={train_len}"
            )
        if windows is None:
            windows = d.shape[0]
        if d.shape[0] != windows or d.shape[0] == 0:
            raise ValueError(
                f"deltas[{i}] has {d.shape[0]} windows, expected {windows} (and at least 1)"
            )
        if d.shape[2] == 0:
            raise ValueError(f"deltas[{i}] has no channels (shape {d.shape})")
        if not np.issubdtype(d.dtype, np.floating):
            raise ValueError(f"deltas[{i}] must be floating point, got dtype {d.dtype}")
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError(f"deltas[{i}] must be finite and >= 0 (Δ after softplus)")
        if a.ndim not in (1, 2) or a.shape[0] != d.shape[2]:
            raise ValueError(
                f"A[{i}] must be [channels] or [channels, d_state] with channels="
                f"{d.shape[2]}, got shape {a.shape}"
            )
    return int(windows)



def as_layer_list(name: str, value: Any, *, ndims: tuple[int, ...]) -> list[Any]:
    """A list over layers; a stacked array (layers on axis 0) is split along axis 0."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "shape"):
        arr = np.asarray(value)
        if arr.ndim not in ndims:
            raise ValueError(
                f"{name} must be a list over layers (or an array stacked on axis 0 with ndim in "
                f"{ndims}), got an array of shape {arr.shape}"
            )
        return list(arr)
    raise ValueError(f"{name} must be a list over layers, got {type(value).__name__}")


def short(x: Sequence[int]) -> str:
    x = [int(v) for v in x]
    return str(x) if len(x) <= 6 else f"[{x[0]}, {x[1]}, ... x{len(x)}]"


def check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# A calibration file read back: every header field and array checked before use.

class CalibrationError(ValueError):
    """A calibration file that cannot be used: the message names the file and the field."""


_FLOATS = (np.float32, np.float64)


def check_file_contents(path: str, header: Any, arrays: dict[str, np.ndarray],
                        format_name: str, format_version: int) -> None:
    """Raises CalibrationError naming `path` and the field unless the header and arrays are
    what `Calibration.save` writes (shapes follow from the header; floats finite and >= 0)."""

    def fail(what: str):
        raise CalibrationError(f"{path}: {what}")

    if not isinstance(header, dict):
        fail(f"header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != format_name:
        fail(f"format {header.get('format')!r} is not {format_name!r}")
    if header.get("format_version") != format_version:
        fail(f"unsupported format_version {header.get('format_version')!r} (this library "
             f"reads version {format_version})")

    def field(name: str, ok, want: str):
        if name not in header:
            fail(f"header field {name!r} is missing")
        value = header[name]
        if not ok(value):
            fail(f"header field {name!r} must be {want}, got {value!r}")
        return value

    def is_int(v, lo=1):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    n_layers = field("n_layers", is_int, "an int >= 1")
    channels = field("channels", lambda v: isinstance(v, list) and len(v) == n_layers
                     and all(is_int(c) for c in v), f"a list of {n_layers} ints >= 1")
    train_len = field("train_len", is_int, "an int >= 1")
    windows = field("num_windows", is_int, "an int >= 1")
    field("aggregate", lambda v: v in _AGGREGATES, f"one of {_AGGREGATES}")
    field("clamp_top", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
          and 0 <= v <= 1, "a number in [0, 1]")
    field("slowest_state", lambda v: v is None or v in _SLOWEST_STATE,
          f"null or one of {_SLOWEST_STATE}")
    field("clamp_k", lambda v: is_int(v) and v <= train_len, f"an int in [1, {train_len}]")
    field("architecture", lambda v: isinstance(v, str), "a string")
    field("library_version", lambda v: isinstance(v, str), "a string")
    field("model_info", lambda v: isinstance(v, dict), "an object")
    field("fingerprint", lambda v: v is None or isinstance(v, str), "a string or null")
    if "weights_digest" in header:
        field("weights_digest", lambda v: v is None or isinstance(v, str), "a string or null")
    storage = field("storage", lambda v: v in ("exact", "grid"), "'exact' or 'grid'")
    field("grid", lambda v: isinstance(v, dict) if storage == "grid" else v is None,
          "an object" if storage == "grid" else "null")

    total = sum(channels)
    wanted: dict[str, tuple[tuple[int, ...], tuple]] = {
        "decay_fraction": ((total,), _FLOATS),
        "decay": ((total,), _FLOATS),
        "theta_asym": ((total,), _FLOATS),
    }
    if storage == "exact":
        for i, c in enumerate(channels):
            wanted[f"curves_{i}"] = ((windows, c, train_len), _FLOATS)
            wanted[f"window_decay_{i}"] = ((windows, c), _FLOATS)
    else:
        grid_s = arrays.get("grid_s")
        n = grid_s.shape[0] if isinstance(grid_s, np.ndarray) and grid_s.ndim == 1 else -1
        wanted["grid_s"] = ((n,), (np.int64, np.int32))
        wanted["theta_codes"] = ((2, n, total), (np.uint8,))
    for name in sorted(set(arrays) - set(wanted)):
        fail(f"unexpected array {name!r} for storage {storage!r}")
    for name, (shape, dtypes) in wanted.items():
        if name not in arrays:
            fail(f"array {name!r} is missing")
        a = arrays[name]
        if a.dtype not in [np.dtype(d) for d in dtypes]:
            fail(f"array {name!r} has dtype {a.dtype}, expected "
                 f"{' or '.join(str(np.dtype(d)) for d in dtypes)}")
        if a.shape != shape or -1 in shape:
            fail(f"array {name!r} has shape {a.shape}, but the header implies {shape}")
        if a.dtype.kind == "f" and not (np.all(np.isfinite(a)) and np.all(a >= 0)):
            fail(f"array {name!r} holds NaN, inf or negative values")
    if storage == "grid":
        grid_s = arrays["grid_s"]
        # the grid's first length is train_len + 1 by construction (grid.make_grid)
        if grid_s.size == 0 or grid_s[0] != train_len + 1 or np.any(np.diff(grid_s) <= 0):
            fail(f"array 'grid_s' must be increasing lengths from train_len + 1 = "
                 f"{train_len + 1}")
