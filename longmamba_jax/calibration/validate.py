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
