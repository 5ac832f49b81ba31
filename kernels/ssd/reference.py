"""Mamba2 SSD scan, sequential reference (fp32 ground truth).

Per head h (scalar A[h] and Δ_t[h]), head dim p, state n, group g = h // (H/G):

    S_t[h] = exp(Δ_t[h] A[h]) S_{t-1}[h] + Δ_t[h] x_t[h] ⊗ B_t[g]      # [p, n]
    y_t[h] = S_t[h] C_t[g] + D[h] x_t[h]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_kernels.common import HIGHEST, apply_filter, document_starts


def _expand_groups(a, heads: int):
    """[..., g, n] -> [..., h, n]: head i reads group i // (h/g) (torch repeat_interleave)."""
    groups = a.shape[-2]
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be a multiple of groups ({groups})")
    return jnp.repeat(a, heads // groups, axis=-2)


def ssd_reference(x, dt, A, B, C, D=None, *, initial_state=None, threshold=None,
                  segment_ids=None):
    """Sequential `lax.scan` over time.

    Args:
      x: [b, l, h, p]. dt: [b, l, h] Δ after softplus (and dt_limit). A: [h]. B, C: [b, l, g, n].
      D: [h] or None. initial_state: [b, h, p, n] or None. threshold: [h] folded LongMamba
        filter or None. segment_ids: [b, l] int or None: where the id changes a new document
        starts from a zero state (`common.document_index`).

    Returns:
      y [b, l, h, p] fp32 and the final state [b, h, p, n] fp32.
    """
    f32 = jnp.float32
    x, dt, A, B, C = (a.astype(f32) for a in (x, dt, A, B, C))
    dt = apply_filter(dt, threshold)
    b, _, h, p = x.shape
    n = B.shape[-1]
    B, C = _expand_groups(B, h), _expand_groups(C, h)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    keep = jnp.ones(x.shape[:2], f32) if segment_ids is None else \
        1.0 - document_starts(segment_ids).astype(f32)  # [b, l]: 0 where a document starts

    def step(s, inp):
        x_t, dt_t, B_t, C_t, k_t = inp  # [b, h, p], [b, h], [b, h, n], [b, h, n], [b]
        decay = (jnp.exp(dt_t * A) * k_t[:, None])[..., None, None]
        s = decay * s + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", s, C_t, precision=HIGHEST)
        return s, y_t

    time_major = [jnp.swapaxes(a, 0, 1) for a in (x, dt, B, C, keep)]
    s, ys = jax.lax.scan(step, s0, time_major)
    y = jnp.swapaxes(ys, 0, 1)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x
    return y, s


def ssd_step(state, x, dt, A, B, C, D=None, *, threshold=None):
    """One recurrent step (decoding). x: [b, h, p]; dt: [b, h]; B, C: [b, g, n];
    state [b, h, p, n] fp32. Returns (y [b, h, p] fp32, new state)."""
    f32 = jnp.float32
    x, dt, A, B, C = (a.astype(f32) for a in (x, dt, A, B, C))
    dt = apply_filter(dt, threshold)
    h = x.shape[1]
    B, C = _expand_groups(B, h), _expand_groups(C, h)
    decay = jnp.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * x)[..., None] * B[:, :, None]
    y = jnp.einsum("bhpn,bhn->bhp", state, C, precision=HIGHEST)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x
    return y, state
