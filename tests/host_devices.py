"""Running a test module on 8 host CPU devices.

XLA creates several CPU devices only when XLA_FLAGS=--xla_force_host_platform_device_count=8 is
set before jax starts, so the sharding modules re-run themselves in a subprocess with that flag
(and LMJ_SHARDING_CHILD=1, which selects their multi-device tests); the rest of the suite keeps
its one device. The parent's fast test runs the child's tests not marked slow; its slow test
runs the slow ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = os.environ.get("LMJ_SHARDING_CHILD") == "1"
REPO = Path(__file__).resolve().parents[1]


def run_child(path: str, *, slow: bool, timeout: int = 1800) -> None:
    """Runs the tests of module `path` marked slow (or not) in a subprocess with 8 host CPU
    devices; fails with the child's report unless they all pass."""
    env = {**os.environ, "LMJ_SHARDING_CHILD": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-m", "slow" if slow else "not slow", path],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"


def slow_decay(params, low: float = 0.002, high: float = 0.02, seed: int = 0):
    """`params` with every A = −exp(A_log) drawn in [−high, −low]. At init A reaches −16 and a
    tiny random model forgets its state within a few tokens, so splitting a prompt would not
    show in its logits; with these decays the state carries over hundreds of tokens."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    mixer = params.weights["layers"]["mixer"]
    shape = mixer["A_log"].shape
    a = np.random.default_rng(seed).uniform(low, high, shape)
    layers = {**params.weights["layers"],
              "mixer": {**mixer, "A_log": jnp.asarray(np.log(a), mixer["A_log"].dtype)}}
    return dataclasses.replace(params, weights={**params.weights, "layers": layers})
