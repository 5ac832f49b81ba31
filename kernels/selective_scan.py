"""Public entry point of the Mamba-1 selective scan: one signature, an explicit implementation.

    y, final_state = selective_scan(x, dt, A, B, C, D, implementation="associative")

Implementations: "reference" (sequential lax.scan), "associative" (chunked associative scan, runs
everywhere), "pallas" (GPU kernel; `interpret=True` runs it through the Pallas interpreter on any
platform). Asking for one that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import jax.numpy as jnp

from longmamba_kernels.common import (
    apply_gate,
    check_implementation,
    delta_from_projection,
    filter_threshold,
    gate_input,
)
from longmamba_kernels.selective_scan_associative import selective_scan_associative
from longmamba_kernels.selective_scan_reference import selective_scan_reference


def selective_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    *,
    initial_state=None,
    dt_global=None,
    dt_threshold=None,
    dt_bias=None,
    dt_softplus: bool = False,
    z=None,
    out_dtype=jnp.float32,
    implementation: str = "associative",
    interpret: bool = False,
):
    """Mamba-1 selective scan with the LongMamba Δ filter applied inside the scan.

    Args:
      x: [b, l, e] (fp32 or bf16). dt: [b, l, e] Δ (fp32), or the raw Δ projection (any float
        dtype) with `dt_bias` / `dt_softplus`. A: [e, n] fp32. B, C: [b, l, n]. D: [e] or None.
      initial_state: [b, e, n] fp32 or None.
      dt_global: [e] bool, dt_threshold: [e] fp32 (both or neither): in global channels a token
        with Δ <= threshold gets Δ := 0 (Δ after bias and softplus).
      dt_bias: [e] or None, added to dt; dt_softplus: then Δ = softplus(dt) (mamba_ssm's
        `delta_bias`, `delta_softplus`).
      z: None, or the gate: y := y · silu(z) taken from z's last e columns ([b, l, >= e], so
        in_proj's [x | z] output can be passed whole).
      out_dtype: dtype of y (the state is always fp32).
      implementation: "reference" | "associative" | "pallas". The Pallas kernel computes the
        Δ prologue and the gate in place; the others compute them around the scan.
      interpret: run the Pallas kernel in interpret mode (CPU); only for "pallas".

    Returns:
      (y [b, l, e] out_dtype, final_state [b, e, n] fp32).
    """
    check_implementation(implementation)
    e = x.shape[-1]
    threshold = filter_threshold(dt_global, dt_threshold, e)
    if dt_bias is not None and dt_bias.shape != (e,):
        raise ValueError(f"dt_bias must have shape ({e},); got {dt_bias.shape}")
    if z is not None:
        gate_input(z, e)  # validates the shape
        if z.shape[:2] != x.shape[:2]:
            raise ValueError(f"gate z {z.shape} and x {x.shape} disagree on [b, l]")
    if implementation == "pallas":
        from longmamba_kernels.selective_scan_pallas import selective_scan_pallas

        return selective_scan_pallas(
            x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
            dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, out_dtype=out_dtype,
            interpret=interpret,
        )
    if dt_bias is not None or dt_softplus:
        dt = delta_from_projection(dt, dt_bias, dt_softplus)
    scan = selective_scan_reference if implementation == "reference" else \
        selective_scan_associative
    y, h = scan(x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold)
    if z is not None:
        y = apply_gate(y, gate_input(z, e))
    return y.astype(out_dtype), h
