"""The Mamba-1 selective scan: one signature, an explicit implementation, chosen here.

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] x_t[e] B_t[n]
    y_t[e]    = Σ_n h_t[e, n] C_t[n] + D[e] x_t[e]

    y, final_state = selective_scan(x, dt, A, B, C, D, implementation="associative")

Implementations: "reference" (`reference.py`, sequential lax.scan, the fp32 ground truth),
"associative" (`associative.py`, chunked associative scan, runs everywhere), "pallas" (GPU
kernels; `interpret=True` runs them through the Pallas interpreter on any platform). Of the two
Pallas kernels, `selective_scan_pallas` runs the Mosaic GPU one (`pallas_mosaic.py`) on Hopper
or newer GPUs for n <= 64 and the Triton one (`pallas_triton.py`) elsewhere, unless a config
names one. Asking for an implementation that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longmamba_kernels.common import (
    apply_gate,
    check_implementation,
    check_segment_ids,
    delta_from_projection,
    document_index,
    filter_threshold,
    gate_input,
)
from longmamba_kernels.selective_scan.associative import selective_scan_associative
from longmamba_kernels.selective_scan.reference import selective_scan_reference


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
    segment_ids=None,
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
      segment_ids: [b, l] int or None: packed documents; where the id changes, the state
        starts from zero (the first document continues initial_state; the final state is the
        last document's).
      implementation: "reference" | "associative" | "pallas". The Pallas kernel computes the
        Δ prologue and the gate in place; the others compute them around the scan.
      interpret: run the Pallas kernel in interpret mode (CPU); only for "pallas".

    Returns:
      (y [b, l, e] out_dtype, final_state [b, e, n] fp32).
    """
    check_implementation(implementation)
    b, length, e = x.shape
    segment_ids = check_segment_ids(segment_ids, b, length)
    threshold = filter_threshold(dt_global, dt_threshold, e)
    if dt_bias is not None and dt_bias.shape != (e,):
        raise ValueError(f"dt_bias must have shape ({e},); got {dt_bias.shape}")
    if z is not None:
        gate_input(z, e)  # validates the shape
        if z.shape[:2] != x.shape[:2]:
            raise ValueError(f"gate z {z.shape} and x {x.shape} disagree on [b, l]")
    if implementation == "pallas":
        return selective_scan_pallas(
            x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
            dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, out_dtype=out_dtype,
            segment_ids=segment_ids, interpret=interpret,
        )
    if dt_bias is not None or dt_softplus:
        dt = delta_from_projection(dt, dt_bias, dt_softplus)
    scan = selective_scan_reference if implementation == "reference" else \
        selective_scan_associative
    y, h = scan(x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
                segment_ids=segment_ids)
    if z is not None:
        y = apply_gate(y, gate_input(z, e))
    return y.astype(out_dtype), h


def default_config(interpret: bool = False, n: int = 16):
    """The kernel `selective_scan_pallas` runs when given no config, for state size n: the
    Mosaic GPU kernel (one pass over time) on a Hopper or newer GPU for n <= 64, 1.3–1.5× faster
    than the Triton "lane" layout there (docs/kernels.md); the Triton "lane" layout elsewhere
    (older GPUs, larger n, and interpret mode, where both run)."""
    from longmamba_kernels.selective_scan.pallas_mosaic import MAX_STATE, SelectiveScanMosaicConfig
    from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig

    if not interpret and n <= MAX_STATE and _is_hopper_or_newer():
        return SelectiveScanMosaicConfig()
    return SelectiveScanPallasConfig()


def _is_hopper_or_newer() -> bool:
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform != "gpu":
        return False
    return float(getattr(device, "compute_capability", "0")) >= 9.0


def selective_scan_pallas(
    x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, dt_bias=None,
    dt_softplus=False, z=None, out_dtype=jnp.float32, segment_ids=None, interpret=False,
    config=None, backward_config=None,
):
    """Mamba-1 selective scan, Pallas kernel. Same contract as `selective_scan_reference`, plus
    the fused Δ prologue and gate of `selective_scan`.

    Args:
      x: [b, l, e] fp32 or bf16. dt: [b, l, e] Δ (fp32), or the raw projection (bf16 is read as
        bf16) with dt_bias [e] / dt_softplus. A: [e, n] fp32. B, C: [b, l, n]. D: [e] or None.
      initial_state: [b, e, n] or None. threshold: [e] fp32 folded filter or None.
      z: None or the gate, its last e columns read in place ([b, l, >= e]).
      out_dtype: dtype of y.
      segment_ids: [b, l] int or None: packed documents (the state restarts from zero where
        the id changes; the first document continues initial_state).
      interpret: run through the Pallas interpreter (any platform).
      config: `SelectiveScanPallasConfig` (Triton) or `SelectiveScanMosaicConfig` (Mosaic
        GPU); None: `default_config(interpret, n)`.
      backward_config: `SelectiveScanBackwardConfig` of the gradient kernels (Triton, whichever
        kernel ran the forward); None for the defaults. Differentiable in x, dt, A, B, C, D,
        initial_state, dt_bias and z (and through the final state).

    Returns:
      (y [b, l, e] out_dtype, final_state [b, e, n] fp32).
    """
    from longmamba_kernels.selective_scan.pallas_backward import SelectiveScanBackwardConfig

    config = default_config(interpret, A.shape[-1]) if config is None else config
    if backward_config is None:
        backward_config = SelectiveScanBackwardConfig()
    segment_ids = check_segment_ids(segment_ids, x.shape[0], x.shape[1])
    return _differentiable(x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, segment_ids,
                           bool(dt_softplus), jnp.dtype(out_dtype), bool(interpret), config,
                           backward_config)


def _run_kernel(x, dt, A, B, C, D, h0, thr, dt_bias, z, seg, softplus, out_dtype, interpret,
                config):
    from longmamba_kernels.selective_scan.pallas_mosaic import (
        SelectiveScanMosaicConfig,
        selective_scan_mosaic,
    )
    from longmamba_kernels.selective_scan.pallas_triton import selective_scan_triton

    kernel = selective_scan_mosaic if isinstance(config, SelectiveScanMosaicConfig) else \
        selective_scan_triton
    return kernel(x, dt, A, B, C, D, initial_state=h0, threshold=thr, dt_bias=dt_bias,
                  dt_softplus=softplus, z=z, out_dtype=out_dtype, segment_ids=seg,
                  interpret=interpret, config=config)


# Gradients: the forward kernel runs unchanged and its inputs are the only residuals; one
# backward (`pallas_backward.py`, Triton) serves both forward kernels (docs/kernels.md,
# "Backward passes"). The threshold and the segment ids get no gradient.
@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13, 14, 15))
def _differentiable(x, dt, A, B, C, D, h0, thr, dt_bias, z, seg, softplus, out_dtype, interpret,
                    config, backward_config):
    return _run_kernel(x, dt, A, B, C, D, h0, thr, dt_bias, z, seg, softplus, out_dtype,
                       interpret, config)


def _differentiable_fwd(x, dt, A, B, C, D, h0, thr, dt_bias, z, seg, softplus, out_dtype,
                        interpret, config, backward_config):
    out = _run_kernel(x, dt, A, B, C, D, h0, thr, dt_bias, z, seg, softplus, out_dtype,
                      interpret, config)
    return out, (x, dt, A, B, C, D, h0, thr, dt_bias, z, seg)


def _differentiable_bwd(softplus, out_dtype, interpret, config, backward_config, residuals,
                        cotangents):
    from longmamba_kernels.selective_scan.pallas_backward import selective_scan_backward

    x, dt, A, B, C, D, h0, thr, dt_bias, z, seg = residuals
    dy, d_final = cotangents
    doc = None if seg is None else document_index(seg)
    dx, ddt, dA, dB, dC, dD, dh0, dbias, dz = selective_scan_backward(
        x, dt, A, B, C, D, h0, thr, dt_bias, z, dy, d_final, doc, softplus=softplus,
        interpret=interpret, config=backward_config)
    dthr = None if thr is None else jnp.zeros_like(thr)
    return dx, ddt, dA, dB, dC, dD, dh0, dthr, dbias, dz, None


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)
