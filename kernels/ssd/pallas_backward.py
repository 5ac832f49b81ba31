"""Backward pass of the Mamba2 SSD scan as Pallas GPU kernels (Triton lowering).

Forward (per head, Δ already filtered, a_t = Δ_t A, A⁺ its in-chunk cumsum):

    S_t = exp(a_t) S_{t-1} + Δ_t x_t ⊗ B_t,    y_t = S_t C_t + D x_t

Given dy and dS_final, with S_prev / dS the states at a chunk's start / the state gradients at its
end, everything a chunk contributes is local to the chunk (M = (C Bᵀ) ⊙ exp(A⁺_i − A⁺_j)[j<=i],
P = (dy (Δx)ᵀ) ⊙ exp(A⁺_i − A⁺_j)[j<=i]):

    d(Δx) = Mᵀ dy + exp(A⁺_last − A⁺) ⊙ (B dSᵀ)          dx = Δ d(Δx) + D dy
    dB    = Pᵀ C + (Δx ⊙ exp(A⁺_last − A⁺)) dS           dC = P B + (dy ⊙ exp(A⁺)) S_prevᵀ
    da_t  = Σ_{i>=t, j<t} (P ⊙ C Bᵀ)_ij + Σ_{i>=t} dy_i·y_off_i + Σ_{j<t} v_j
            + exp(A⁺_last) <dS, S_prev>                   dΔ = A da + x·d(Δx),  dA = Σ Δ da

Three kernels: a states pass (one program per batch row × head × block of p walks the chunks
forward writing S_prev, then backward writing dS: the only sequential part, one small matmul
per chunk), then two chunk-parallel kernels: dx, dΔ and da per (chunk, block of a group's heads,
block of p), sharing the chunk's C Bᵀ; dB and dC per (chunk, group, block of n), looping over the
group's heads. Sums over p blocks are per-program partials summed in XLA. Design and costs:
docs/kernels.md, "Backward passes".

Packed documents: with the document index (int32 [b, l]) every kernel masks the chunk's terms as
the forward does (`common.chunk_documents`): M and P to same-document pairs, exp(A⁺) to the
document running before the chunk, exp(A⁺_last − A⁺) to the chunk's last document, and
exp(A⁺_last) to chunks without a document start; the formulas above then hold unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from longmamba_kernels.common import (
    LOG2E,
    chunk_documents,
    pad_axis,
    pad_time,
    with_optional_ref,
)


@dataclasses.dataclass(frozen=True)
class SSDBackwardConfig:
    """Block sizes of the SSD backward kernels.

    Attributes:
      chunk: s, tokens per chunk (power of two >= 16). The states the backward keeps are
        [b, l/s, h, p, n]: a larger s means fewer of them, larger [s, s] tiles.
      block_p: head-dim rows per program of the dx / dΔ kernel (power of two >= 16).
      heads_per_program: heads of one group each dx / dΔ program walks, computing the group's
        C Bᵀ of the chunk once for all of them (a divisor of the heads per group is used: the
        largest one not above this).
      states_block_p: head-dim rows per program of the states pass (power of two >= 16).
      states_unroll: chunks per iteration of the states pass's two walks (>= 1). The walks are
        the only sequential part; several chunks per iteration let one chunk's loads overlap
        another's work.
      states_num_warps: warps per program of the states pass (its programs should all fit on
        the GPU at once: batch × heads × p/states_block_p of them).
      block_n: state columns per program of the dB / dC kernel (power of two >= 16).
      num_warps: warps per program of the other two kernels.
      num_stages: Triton software-pipelining depth of the loops.
      fp32_states: keep S_prev and dS in fp32 for bf16 inputs too (default: the matmul dtype,
        as they only enter bf16 matmuls there).
    """

    chunk: int = 64
    block_p: int = 32
    heads_per_program: int = 4
    states_block_p: int = 16
    states_unroll: int = 2
    states_num_warps: int = 4
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    fp32_states: bool = False

    def __post_init__(self):
        for name in ("chunk", "block_p", "states_block_p", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"SSDBackwardConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("heads_per_program", "states_unroll", "states_num_warps", "num_warps",
                     "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"SSDBackwardConfig.{name} must be >= 1, got {getattr(self, name)}")


def _pow2_at_least_16(v: int) -> int:
    return max(16, 1 << (v - 1).bit_length())


def _dot(dot_dtype):
    prec = jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    return functools.partial(jnp.dot, precision=prec, preferred_element_type=jnp.float32)


def _decays(dt_ref, bi, t_sl, hi, a, thr):
    """Filtered Δ [s], base-2 in-chunk cumsum A⁺ [s] of Δ a (a = A log2 e) and its last value."""
    dt = dt_ref[bi, t_sl, hi].astype(jnp.float32)
    dt = jnp.where(dt <= thr, 0.0, dt)  # LongMamba filter (thr = -inf: unfiltered)
    da = dt * a
    return dt, jnp.cumsum(da), jnp.sum(da)


def _causal_decay(a_cum, chunk, docs=None):
    """exp2(A⁺_i − A⁺_j) for j <= i (and d_i = d_j with `docs`), else 0: [s, s]."""
    idx = jnp.arange(chunk)
    link = idx[:, None] >= idx[None, :]
    if docs is not None:
        link = link & (docs[0][:, None] == docs[0][None, :])
    seg = jnp.where(link, a_cum[:, None] - a_cum[None, :], -jnp.inf)
    return jnp.exp2(seg)


def _carried(a_cum, docs):
    """2^A⁺ [s], the decay of the state entering the chunk (0 outside its document)."""
    v = jnp.exp2(a_cum)
    return v if docs is None else jnp.where(docs[1], v, 0.0)


def _to_end(a_cum, a_last, docs):
    """2^(A⁺_last − A⁺) [s], the decay to the chunk's end (0 outside its last document)."""
    v = jnp.exp2(a_last - a_cum)
    return v if docs is None else jnp.where(docs[2], v, 0.0)


def _through(a_last, docs):
    """A⁺_last, the log-decay of the state passing the chunk (−∞ if a document starts)."""
    return a_last if docs is None else jnp.where(docs[3], a_last, -jnp.inf)


def _walk(step, n_chunks, unroll, carry):
    """carry after step(ci, carry) for ci = 0 .. n_chunks − 1, `unroll` steps per loop
    iteration (the remainder after the loop)."""
    def block(k, c):
        for u in range(unroll):
            c = step(k * unroll + u, c)
        return c

    n_main = n_chunks // unroll
    carry = jax.lax.fori_loop(0, n_main, block, carry)
    for ci in range(n_main * unroll, n_chunks):
        carry = step(ci, carry)
    return carry


def _states_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, thr_ref, s0_ref, dy_ref, dsf_ref,
                   doc_ref, sp_ref, dsn_ref, ds0_ref, *, chunk, block_p, n_chunks, unroll,
                   heads_per_group, has_init, dot_dtype):
    """S_prev[c] (the state before chunk c) forward, then dS[c] (the gradient of the state after
    chunk c) backward, for one batch row × head × block of p; and d initial_state."""
    f32 = jnp.float32
    bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // heads_per_group
    p_sl = pl.ds(pi * block_p, block_p)
    dot = _dot(dot_dtype)
    a, thr = a_ref[hi], thr_ref[hi]
    n = sp_ref.shape[-1]
    s = (s0_ref[bi, hi, p_sl, :].astype(f32) if has_init else jnp.zeros((block_p, n), f32))

    def docs(ci):
        return None if doc_ref is None else chunk_documents(doc_ref, bi, ci * chunk, chunk)

    def forward(ci, s):
        t_sl = pl.ds(ci * chunk, chunk)
        dt, a_cum, a_last = _decays(dt_ref, bi, t_sl, hi, a, thr)
        dc = docs(ci)
        sp_ref[bi, ci, hi, p_sl, :] = s.astype(sp_ref.dtype)
        x = x_ref[bi, t_sl, hi, p_sl].astype(f32)  # [s, p_blk]
        w = (x * (dt * _to_end(a_cum, a_last, dc))[:, None]).astype(dot_dtype)
        return (jnp.exp2(_through(a_last, dc)) * s
                + dot(w.T, b_ref[bi, t_sl, gi, :].astype(dot_dtype)))

    _walk(forward, n_chunks, unroll, s)

    def backward(i, ds):
        ci = n_chunks - 1 - i
        t_sl = pl.ds(ci * chunk, chunk)
        _, a_cum, a_last = _decays(dt_ref, bi, t_sl, hi, a, thr)
        dc = docs(ci)
        dsn_ref[bi, ci, hi, p_sl, :] = ds.astype(dsn_ref.dtype)
        dy = dy_ref[bi, t_sl, hi, p_sl].astype(f32)  # [s, p_blk]
        w = (dy * _carried(a_cum, dc)[:, None]).astype(dot_dtype)
        return (jnp.exp2(_through(a_last, dc)) * ds
                + dot(w.T, c_ref[bi, t_sl, gi, :].astype(dot_dtype)))

    ds = _walk(backward, n_chunks, unroll, dsf_ref[bi, hi, p_sl, :].astype(f32))
    ds0_ref[bi, hi, p_sl, :] = ds


def _dx_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, thr_ref, dy_ref, sp_ref, dsn_ref,
               doc_ref, dx_ref, da_ref, ddt_ref, *, chunk, block_p, n_chunks, heads_per_group,
               heads_per_program, has_d, dot_dtype):
    """dx, and the p block's parts of da and x·d(Δx), for one (batch row, chunk) × block of
    `heads_per_program` heads of one group × block of p: C Bᵀ once, then head by head."""
    f32 = jnp.float32
    pid0, hb, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, ci = pid0 // n_chunks, pid0 % n_chunks
    h0 = hb * heads_per_program
    gi = h0 // heads_per_group
    p_sl, t_sl = pl.ds(pi * block_p, block_p), pl.ds(ci * chunk, chunk)
    dot = _dot(dot_dtype)
    load_bc = lambda: (b_ref[bi, t_sl, gi, :].astype(dot_dtype),  # [s, n] each
                       c_ref[bi, t_sl, gi, :].astype(dot_dtype))
    bm, cm = load_bc()
    cb = dot(cm, bm.T)  # [i, j], shared by the group's heads
    docs = None if doc_ref is None else chunk_documents(doc_ref, bi, ci * chunk, chunk)
    idx = jnp.arange(chunk)
    ge = idx[:, None] >= idx[None, :]  # [i, t]: i >= t
    diag = idx[:, None] == idx[None, :]

    def head(r, carry):
        hi = h0 + r
        dt, a_cum, a_last = _decays(dt_ref, bi, t_sl, hi, a_ref[hi], thr_ref[hi])
        x = x_ref[bi, t_sl, hi, p_sl].astype(f32)  # [s, p_blk]
        dy = dy_ref[bi, t_sl, hi, p_sl].astype(f32)  # [s, p_blk]
        sp = sp_ref[bi, ci, hi, p_sl, :]  # [p_blk, n] state before the chunk
        dsn = dsn_ref[bi, ci, hi, p_sl, :]  # [p_blk, n] gradient of the state after it
        bm, cm = load_bc()  # again per head (cached): fewer registers held across the loop
        m = cb * _causal_decay(a_cum, chunk, docs)  # [i, j]
        to_end = _to_end(a_cum, a_last, docs)  # [s]
        bds = dot(bm, dsn.astype(dot_dtype).T)  # [s, p_blk]
        dxdt = dot(m.astype(dot_dtype).T, dy.astype(dot_dtype)) + to_end[:, None] * bds
        dx = dt[:, None] * dxdt
        if has_d:
            dx = dx + d_ref[hi] * dy
        dx_ref[bi, t_sl, hi, p_sl] = dx.astype(dx_ref.dtype)
        xdt = x * dt[:, None]
        # da_t, the gradient of the log-decay a_t = Δ_t A, summed without cancellation:
        # Σ_{i>=t} (Σ_{j<t} w_ij + off_i) + Σ_{j<t} v_j, the last one put on the diagonal
        w = dot(dy.astype(dot_dtype), xdt.astype(dot_dtype).T) * m  # [i, j]
        y_off = _carried(a_cum, docs)[:, None] * dot(cm, sp.astype(dot_dtype).T)  # [s, p_blk]
        off = jnp.sum(dy * y_off, axis=1)  # [s]
        v = jnp.sum(xdt * to_end[:, None] * bds, axis=1)  # [s]
        z = jnp.cumsum(w, axis=1) - w + off[:, None]  # [i, t]
        z = z + jnp.where(diag, (jnp.cumsum(v) - v)[None, :], 0.0)
        da = jnp.sum(jnp.where(ge, z, 0.0), axis=0)
        da = da + jnp.exp2(_through(a_last, docs)) * jnp.sum(dsn.astype(f32) * sp.astype(f32))
        da_ref[pi, bi, hi, t_sl] = da
        ddt_ref[pi, bi, hi, t_sl] = jnp.sum(x * dxdt, axis=1)
        return carry

    jax.lax.fori_loop(0, heads_per_program, head, 0)


def _dbc_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, thr_ref, dy_ref, sp_ref, dsn_ref,
                doc_ref, db_ref, dc_ref, *, chunk, block_n, n_chunks, heads_per_group, dot_dtype):
    """dB and dC of one (batch row, chunk) × group × block of n, summed over the group's heads:
    dB = dCBᵀ C + Σ_h (Δx ⊙ exp(A⁺_last − A⁺)) dS_h,  dC = dCB B + Σ_h (dy ⊙ exp(A⁺)) S_prev_h,
    with dCB = Σ_h P_h."""
    f32 = jnp.float32
    pid0, gi, ni = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, ci = pid0 // n_chunks, pid0 % n_chunks
    n_sl, t_sl = pl.ds(ni * block_n, block_n), pl.ds(ci * chunk, chunk)
    dot = _dot(dot_dtype)
    docs = None if doc_ref is None else chunk_documents(doc_ref, bi, ci * chunk, chunk)

    def head(r, carry):
        dcb, db, dc = carry
        hi = gi * heads_per_group + r
        dt, a_cum, a_last = _decays(dt_ref, bi, t_sl, hi, a_ref[hi], thr_ref[hi])
        xdt = x_ref[bi, t_sl, hi, :].astype(f32) * dt[:, None]  # [s, p]
        dy = dy_ref[bi, t_sl, hi, :].astype(f32)  # [s, p]
        dcb = dcb + dot(dy.astype(dot_dtype), xdt.astype(dot_dtype).T) * _causal_decay(
            a_cum, chunk, docs)
        wb = (xdt * _to_end(a_cum, a_last, docs)[:, None]).astype(dot_dtype)
        db = db + dot(wb, dsn_ref[bi, ci, hi, :, n_sl].astype(dot_dtype))
        wc = (dy * _carried(a_cum, docs)[:, None]).astype(dot_dtype)
        dc = dc + dot(wc, sp_ref[bi, ci, hi, :, n_sl].astype(dot_dtype))
        return dcb, db, dc

    zeros = jnp.zeros((chunk, block_n), f32)
    init = (jnp.zeros((chunk, chunk), f32), zeros, zeros)
    dcb, db, dc = jax.lax.fori_loop(0, heads_per_group, head, init)
    dcb = dcb.astype(dot_dtype)
    db = db + dot(dcb.T, c_ref[bi, t_sl, gi, n_sl].astype(dot_dtype))
    dc = dc + dot(dcb, b_ref[bi, t_sl, gi, n_sl].astype(dot_dtype))
    db_ref[bi, t_sl, gi, n_sl] = db
    dc_ref[bi, t_sl, gi, n_sl] = dc


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def ssd_backward(x, dt, A, B, C, D, initial_state, threshold, dy, d_final, doc=None, *,
                 interpret, config):
    """Gradients of `ssd_pallas` (same argument contract) for the cotangents dy [b, l, h, p]
    and d_final [b, h, p, n]; `doc` the document index [b, l] int32 of packed documents, or
    None.

    Returns (dx, dΔ, dA, dB, dC, dD, d initial_state), each in its input's dtype (dD and
    d initial_state None when D / initial_state are None). A filtered Δ gets zero gradient.
    """
    f32 = jnp.float32
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    dot_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else f32
    state_dtype = f32 if config.fp32_states else dot_dtype
    chunk = config.chunk
    pp, np_ = _pow2_at_least_16(p), _pow2_at_least_16(n)
    block_p, states_bp = min(config.block_p, pp), min(config.states_block_p, pp)
    block_n = min(config.block_n, np_)
    heads_per_group = h // g
    hpp = max(d for d in range(1, min(config.heads_per_program, heads_per_group) + 1)
              if heads_per_group % d == 0)
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk
    pad_pn = lambda a, size: pad_axis(pad_time(a, chunk), a.ndim - 1, size)
    xs, dys = pad_pn(x, pp), pad_pn(dy, pp)  # [b, l', h, p']
    Bs = pad_pn(B, np_).astype(dot_dtype)  # [b, l', g, n']
    Cs = pad_pn(C, np_).astype(dot_dtype)
    dts = pad_time(dt.astype(f32), chunk)  # Δ = 0 on padding: the states stay exact
    a2 = A.astype(f32) * np.float32(LOG2E)
    thr = np.full((h,), -np.inf, np.float32) if threshold is None else threshold.astype(f32)
    has_d, has_init = D is not None, initial_state is not None
    d = D.astype(f32) if has_d else np.zeros((h,), np.float32)
    pad_state = lambda s: pad_axis(pad_axis(s.astype(f32), 2, pp), 3, np_)
    s0 = pad_state(initial_state) if has_init else np.zeros((1, 1, 1, 1), np.float32)
    dsf = pad_state(d_final)
    packed = doc is not None
    docs = [jnp.pad(doc, ((0, 0), (0, padded - length)), mode="edge")] if packed else []
    from jax.experimental.pallas import triton as plgpu

    params = lambda warps: plgpu.CompilerParams(num_warps=warps, num_stages=config.num_stages)
    call = functools.partial(pl.pallas_call, compiler_params=params(config.num_warps),
                             interpret=interpret)
    states = jax.ShapeDtypeStruct((b, n_chunks, h, pp, np_), state_dtype)
    sp, dsn, ds0 = call(
        with_optional_ref(functools.partial(
            _states_kernel, chunk=chunk, block_p=states_bp, n_chunks=n_chunks,
            unroll=config.states_unroll, heads_per_group=heads_per_group, has_init=has_init,
            dot_dtype=dot_dtype), 9, packed),
        grid=(b, h, pp // states_bp),
        out_shape=[states, states, jax.ShapeDtypeStruct((b, h, pp, np_), f32)],
        compiler_params=params(config.states_num_warps),
        name="ssd_bwd_states",
    )(xs, dts, a2, Bs, Cs, thr, s0, dys, dsf, *docs)
    n_pb = pp // block_p
    partial_shape = jax.ShapeDtypeStruct((n_pb, b, h, padded), f32)
    dx, da, ddt = call(
        with_optional_ref(functools.partial(
            _dx_kernel, chunk=chunk, block_p=block_p, n_chunks=n_chunks,
            heads_per_group=heads_per_group, heads_per_program=hpp, has_d=has_d,
            dot_dtype=dot_dtype), 10, packed),
        grid=(b * n_chunks, h // hpp, n_pb),
        out_shape=[jax.ShapeDtypeStruct((b, padded, h, pp), x.dtype), partial_shape,
                   partial_shape],
        name="ssd_bwd_dx",
    )(xs, dts, a2, Bs, Cs, d, thr, dys, sp, dsn, *docs)
    dB, dC = call(
        with_optional_ref(functools.partial(
            _dbc_kernel, chunk=chunk, block_n=block_n, n_chunks=n_chunks,
            heads_per_group=heads_per_group, dot_dtype=dot_dtype), 9, packed),
        grid=(b * n_chunks, g, np_ // block_n),
        out_shape=[jax.ShapeDtypeStruct((b, padded, g, np_), f32)] * 2,
        name="ssd_bwd_dbc",
    )(xs, dts, a2, Bs, Cs, thr, dys, sp, dsn, *docs)
    # da_t: the gradient of a_t = Δ_t A; the filter's dropped tokens have Δ = 0 and get none
    da = jnp.moveaxis(jnp.sum(da, axis=0), 1, 2)[:, :length]  # [b, l, h]
    ddt = jnp.moveaxis(jnp.sum(ddt, axis=0), 1, 2)[:, :length]
    dt32 = dt.astype(f32)
    keep = dt32 > thr
    d_dt = jnp.where(keep, A.astype(f32) * da + ddt, 0.0)
    dA = jnp.sum(jnp.where(keep, dt32, 0.0) * da, axis=(0, 1))
    dD = None
    if has_d:
        dD = jnp.einsum("blhp,blhp->h", dy.astype(f32), x.astype(f32),
                        precision=jax.lax.Precision.HIGHEST).astype(D.dtype)
    ds0 = ds0[:, :, :p, :n].astype(initial_state.dtype) if has_init else None
    return (dx[:, :length, :, :p], d_dt.astype(dt.dtype), dA.astype(A.dtype),
            dB[:, :length, :, :n].astype(B.dtype), dC[:, :length, :, :n].astype(C.dtype), dD, ds0)
