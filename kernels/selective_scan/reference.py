"""Mamba-1 selective scan, sequential reference (fp32 ground truth).

Per channel e and state n, with Δ already softplus'ed (and LongMamba-filtered):

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] x_t[e] B_t[n]
    y_t[e]    = Σ_n h_t[e, n] C_t[n] + D[e] x_t[e]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_kernels.common import HIGHEST, apply_filter, document_starts


def selective_scan_reference(x, dt, A, B, C, D=None, *, initial_state=None, threshold=None,
                             segment_ids=None):
    """Sequential `lax.scan` over time.

    Args:
      x: [b, l, e] inputs. dt: [b, l, e] Δ after softplus. A: [e, n]. B, C: [b, l, n].
      D: [e] or None. initial_state: [b, e, n] or None (zeros). threshold: [e] fp32 folded
        LongMamba filter (see `common.filter_threshold`) or None. segment_ids: [b, l] int or
        None: where the id changes a new document starts from a zero state.

    Returns:
      y [b, l, e] fp32 and the final state [b, e, n] fp32.
    """
    f32 = jnp.float32
    x, dt, A, B, C = (a.astype(f32) for a in (x, dt, A, B, C))
    dt = apply_filter(dt, threshold)
    b, _, e = x.shape
    n = A.shape[-1]
    h0 = jnp.zeros((b, e, n), f32) if initial_state is None else initial_state.astype(f32)

    keep = jnp.ones(x.shape[:2], f32) if segment_ids is None else \
        1.0 - document_starts(segment_ids).astype(f32)  # [b, l]: 0 where a document starts

    def step(h, inp):
        x_t, dt_t, B_t, C_t, k_t = inp  # [b, e], [b, e], [b, n], [b, n], [b]
        decay = jnp.exp(dt_t[..., None] * A) * k_t[:, None, None]
        h = decay * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
        y_t = jnp.einsum("ben,bn->be", h, C_t, precision=HIGHEST)
        return h, y_t

    time_major = [jnp.swapaxes(a, 0, 1) for a in (x, dt, B, C, keep)]
    h, ys = jax.lax.scan(step, h0, time_major)
    y = jnp.swapaxes(ys, 0, 1)
    if D is not None:
        y = y + D.astype(f32) * x
    return y, h


def selective_state_step(state, x, dt, A, B, C, D=None, *, threshold=None):
    """One recurrent step (decoding). x, dt: [b, e]; B, C: [b, n]; state [b, e, n] fp32.

    Returns (y [b, e] fp32, new state [b, e, n] fp32)."""
    f32 = jnp.float32
    x, dt, A, B, C = (a.astype(f32) for a in (x, dt, A, B, C))
    dt = apply_filter(dt, threshold)
    state = jnp.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, None, :]
    y = jnp.einsum("ben,bn->be", state, C, precision=HIGHEST)
    if D is not None:
        y = y + D.astype(f32) * x
    return y, state
