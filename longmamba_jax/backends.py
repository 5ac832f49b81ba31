"""Choosing the scan implementation behind `backend=`.

- "reference": sequential `lax.scan` (ground truth; slow).
- "associative": chunked associative scan (Mamba-1) / chunked SSD in jnp (Mamba2); runs anywhere.
- "pallas": the Pallas GPU kernels in `kernels/` (GPU only).
- "pallas-interpret": the same kernels through the Pallas interpreter (any platform; for tests).
- "auto": "pallas" on a GPU when the kernels are present, else "associative"; the choice is
  logged (logger "longmamba_jax"), never printed.
Asking for a backend that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import jax

from longmamba_jax.mixers import ScanBackend

BACKENDS = ("auto", "reference", "associative", "pallas", "pallas-interpret")

logger = logging.getLogger("longmamba_jax")


def _pallas_present() -> bool:
    return all(
        importlib.util.find_spec(f"longmamba_kernels.{m}") is not None
        for m in ("ssd.pallas_triton", "selective_scan.pallas_triton")
    )


@functools.cache
def resolve_backend(name: str) -> ScanBackend:
    """Maps a user-facing backend name to the kernel implementation the mixers call."""
    if isinstance(name, ScanBackend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    platform = jax.default_backend()
    if name == "auto":
        choice = "pallas" if platform == "gpu" and _pallas_present() else "associative"
        logger.info("backend='auto' chose %r on platform %r", choice, platform)
        return resolve_backend(choice)
    if name in ("pallas", "pallas-interpret") and not _pallas_present():
        raise ValueError(f"backend={name!r}: the Pallas kernels are not installed in kernels/")
    if name == "pallas":
        if platform != "gpu":
            raise ValueError(
                f"backend='pallas' needs a GPU (jax platform is {platform!r}); use "
                "'pallas-interpret' to run the same kernels through the interpreter"
            )
        return ScanBackend("pallas", False)
    if name == "pallas-interpret":
        return ScanBackend("pallas", True)
    return ScanBackend(name, False)
