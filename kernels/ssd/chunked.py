"""Mamba2 SSD scan, portable chunked version in jnp (the "associative" backend for Mamba2).

The sequence is cut into chunks of s tokens. Within a chunk the scan is a masked matmul
(quadratic in s); across chunks the states are carried by a `lax.scan` (linear in the number of
chunks, so memory stays bounded for any length). With a_t = Δ_t A and A⁺ its in-chunk cumsum:

    y_diag[i] = Σ_{j<=i} (C_i·B_j) exp(A⁺_i − A⁺_j) Δ_j x_j             (inside the chunk)
    chunk_state = Σ_j exp(A⁺_last − A⁺_j) Δ_j x_j ⊗ B_j                   (what the chunk adds)
    S_next = exp(A⁺_last) S_prev + chunk_state                             (across chunks)
    y_off[i] = exp(A⁺_i) S_prev C_i                                        (carried state)

Packed documents (`segment_ids`): every term above is kept only between positions of the same
document (and the carried state only for positions of the document that was running when the
chunk began), which is the state starting from zero at each document's first token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_kernels.common import HIGHEST, apply_filter, document_index, pad_time


def ssd_chunked(x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, chunk_size=256,
                segment_ids=None):
    """Same contract as `ssd_reference`; `chunk_size` is s (any length is padded internally)."""
    f32 = jnp.float32
    x, dt, A, B, C = (a.astype(f32) for a in (x, dt, A, B, C))
    dt = apply_filter(dt, threshold)
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    r = h // g  # heads per group
    s = min(chunk_size, max(length, 1))
    xs, dts, Bs, Cs = (pad_time(a, s) for a in (x, dt, B, C))  # Δ = 0 on padding
    nc = xs.shape[1] // s
    # [b, c·s, ...] -> [c, b, s, ...]; heads split as (g, r) so head = g_i·r + r_i.
    to_chunks = lambda a: jnp.moveaxis(a.reshape(b, nc, s, *a.shape[2:]), 1, 0)
    xs = to_chunks(xs.reshape(b, -1, g, r, p))  # [c, b, s, g, r, p]
    dts = to_chunks(dts.reshape(b, -1, g, r))  # [c, b, s, g, r]
    Bs, Cs = to_chunks(Bs), to_chunks(Cs)  # [c, b, s, g, n]
    packed = segment_ids is not None
    if packed:
        doc = document_index(segment_ids)  # [b, l]
        doc = jnp.pad(doc, ((0, 0), (0, nc * s - length)), mode="edge")  # padding: last doc
        before = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), doc[:, s - 1:-1:s]], axis=1)
        docs, before = to_chunks(doc), jnp.moveaxis(before, 1, 0)  # [c, b, s], [c, b]
    else:
        docs = before = jnp.zeros((nc, b, 1), jnp.int32)  # unused
    A = A.reshape(g, r)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    causal = jnp.tril(jnp.ones((s, s), bool))  # [i, j]: j <= i

    def chunk(state, inp):
        x_c, dt_c, B_c, C_c, d_c, p_c = inp  # d_c [b, s] documents, p_c [b] the one before
        state = state.reshape(b, g, r, p, n)
        a_cum = jnp.cumsum(dt_c * A, axis=1)  # [b, s, g, r]
        seg = a_cum[:, :, None] - a_cum[:, None, :]  # [b, i, j, g, r]
        link = causal[None, :, :, None, None]
        if packed:  # j feeds i only inside one document
            link = link & (d_c[:, :, None] == d_c[:, None, :])[..., None, None]
        decay = jnp.exp(jnp.where(link, seg, -jnp.inf))
        cb = jnp.einsum("bign,bjgn->bijg", C_c, B_c, precision=HIGHEST)  # [b, i, j, g]
        xdt = x_c * dt_c[..., None]  # [b, s, g, r, p]
        y_diag = jnp.einsum("bijg,bijgr,bjgrp->bigrp", cb, decay, xdt, precision=HIGHEST)
        carried = jnp.exp(a_cum)  # [b, s, g, r]: decay of the entering state
        tail = jnp.exp(a_cum[:, -1:] - a_cum)  # [b, s, g, r]: decay to the chunk's end
        through = jnp.exp(a_cum[:, -1])  # [b, g, r]
        if packed:
            carried = carried * (d_c == p_c[:, None])[..., None, None]
            tail = tail * (d_c == d_c[:, -1:])[..., None, None]
            through = through * (d_c[:, -1] == p_c)[:, None, None]
        y_off = jnp.einsum("bign,bgrpn,bigr->bigrp", C_c, state, carried, precision=HIGHEST)
        new = jnp.einsum("bjgn,bjgr,bjgrp->bgrpn", B_c, tail, xdt, precision=HIGHEST)
        state = through[..., None, None] * state + new
        return state.reshape(b, h, p, n), (y_diag + y_off).reshape(b, s, h, p)

    state, ys = jax.lax.scan(chunk, s0, (xs, dts, Bs, Cs, docs, before))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, nc * s, h, p)[:, :length]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x
    return y, state
