"""Small helpers the benchmarks share: relative error, byte counts, config fields and lengths
from the command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_evals.tasks.lengths import parse_lengths

__all__ = ["K", "finite", "lengths", "nbytes", "parse_fields", "rel_err", "write_json"]

K = 1024


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN when `a` is not finite)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def finite(tree) -> bool:
    """Whether every leaf of a pytree of arrays is finite."""
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def nbytes(*arrays) -> int:
    """Total bytes of `arrays` (shapes and dtypes only)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def parse_fields(text: str) -> dict:
    """"a=1,b=True" -> {"a": 1, "b": True} (config fields from the command line)."""
    kw = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    conv = lambda v: (v == "True" if v in ("True", "False")
                      else int(v) if v.lstrip("-").isdigit() else v)
    return {k: conv(v) for k, v in kw.items()}


def lengths(text: str) -> list[int]:
    """"4K,16K,1000" -> [4096, 16384, 1000] (K = 1,024); "" -> []."""
    return parse_lengths(text, k=K) if text else []


def write_json(path: str, obj, indent: int = 1) -> None:
    """Writes `obj` as JSON to `path` (values JSON cannot hold as their `str`)."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=indent, default=str)
