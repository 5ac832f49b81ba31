"""Backward pass of the Mamba-1 selective scan as Pallas GPU kernels (Triton lowering).

Forward per channel e and state n (Δ after the fused bias + softplus and the LongMamba filter):

    h_t = a_t h_{t-1} + Δ_t x_t B_t,  a_t = exp(Δ_t A),   y_t = Σ_n h_t C_t + D x_t,
    out_t = y_t · silu(z_t)   (with a gate)

The adjoint G_t = ∂L/∂h_t runs backwards, G_t = dy_t C_t + a_{t+1} G_{t+1} (G after the last token
is the final state's cotangent), and with q_t = a_t h_{t-1}:

    dx_t = Δ_t Σ_n G_t B_t + D dy_t        dΔ_t = x_t Σ_n G_t B_t + Σ_n A G_t q_t
    dA   = Σ_t Δ_t G_t q_t                 dB_t = Σ_e Δ_t x_t G_t,   dC_t = Σ_e dy_t h_t

Time is cut into segments of `segment` tokens, walked by separate programs (the "lane" layout of
`pallas_triton.py`: a thread owns whole channels, their n states are registers):
1. a local pass walks each segment forward from a zero state, keeping its final state, the
   adjoint it sends to the previous segment (from dy alone) and Σ Δ, and writing the local state
   at the start of every block of `block_t` tokens;
2. a fold walks the segments (elementwise) forward for each segment's true initial state and
   backward for the adjoint entering each segment's end (and d initial_state);
3. the main pass walks each segment's blocks from the last: it rebuilds a block's states from
   its checkpoint (h = h_local + exp(A Σ Δ) h_segment_start), keeps the block's states and decays
   in registers, and walks the block backwards with G.
Sums over channels (dB, dC) are per-program partials, sums over time (dA, dD, d dt_bias)
per-segment partials, added in XLA. Design and costs: docs/kernels.md, "Backward passes".

Packed documents: a_t = exp(Δ_t A + r_t) with r_t = −∞ at a document's first token
(`common.reset_offsets`), so a_t = 0 there and everything above holds as written; the products
over a segment (the fold) and from a segment's start to a checkpoint (the main pass's rebuild)
get the offset −∞ where a document starts inside them (`common.span_offsets`).
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
    gate_input,
    pad_axis,
    pad_time,
    reset_offsets,
    span_offsets,
    with_optional_ref,
)
from longmamba_kernels.selective_scan.pallas_triton import _math


@dataclasses.dataclass(frozen=True)
class SelectiveScanBackwardConfig:
    """Blocks of the selective-scan backward kernels.

    Attributes:
      block_e: channels per program (a power of two; None: 32 × num_warps, one per thread).
      block_t: tokens whose states and decays a program holds in registers while it walks them
        backwards, and the interval of the local pass's checkpoints (None: 64 / n, at least 1).
      segment: tokens per program (a multiple of block_t; shorter inputs use one segment).
      num_warps: warps per program.
      num_stages: Triton software-pipelining depth of the loops.
      fast_math: compiled kernels only: decays as inline `ex2.approx.ftz` and state updates as
        `fma.rn` (as the forward kernel); interpret mode computes the same with jnp.
    """

    block_e: int | None = None
    block_t: int | None = None
    segment: int = 256
    num_warps: int = 1
    num_stages: int = 2
    fast_math: bool = True

    def __post_init__(self):
        if self.block_e is not None and (self.block_e < 1 or self.block_e & (self.block_e - 1)):
            raise ValueError(f"block_e must be a power of two, got {self.block_e}")
        if self.block_t is not None and self.block_t < 1:
            raise ValueError(f"block_t must be >= 1, got {self.block_t}")
        if self.segment < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"segment, num_warps and num_stages must be >= 1: {self}")


def _delta(dt, bias, softplus, thr, valid, exp2):
    """(Δ, the factor dΔ → d dt): Δ = filter(softplus(dt + bias)) as the forward computes it,
    0 on padded tokens; the factor is sigmoid(dt + bias) with softplus, 1 without, and 0 where
    the filter dropped the token or the token is padding."""
    v = dt.astype(jnp.float32)
    if bias is not None:
        v = v + bias
    if softplus:
        delta = jnp.maximum(v, 0.0) + jnp.log1p(exp2(jnp.abs(v) * -LOG2E))
        grad = 1.0 / (1.0 + exp2(v * -LOG2E))
    else:
        delta, grad = v, 1.0
    keep = (delta > thr) & valid  # LongMamba filter (thr = -inf: unfiltered)
    return jnp.where(keep, delta, 0.0), jnp.where(keep, grad, 0.0)


def _gate(dout, z, exp2):
    """(dy, silu(z) factors) for out = y · silu(z): dy = dout · z σ(z); dz needs y as well."""
    dout = dout.astype(jnp.float32)
    if z is None:
        return dout, None
    z = z.astype(jnp.float32)
    sig = 1.0 / (1.0 + exp2(z * -LOG2E))
    return dout * z * sig, (z, sig)


def _program_block(a_ref, thr_ref, bias_ref, *, block_e, z_off, fast, has_bias):
    """What passes 1 and 3 read first: the program ids (batch, channel block, segment), the
    channel block's slices (z's offset by z_off), the exp2/fma pair, A·log2(e) per state ([e_blk]
    each), the filter thresholds and Δ's bias (None without one)."""
    bi, ei, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e_sl = pl.ds(ei * block_e, block_e)
    z_sl = pl.ds(z_off + ei * block_e, block_e)
    exp2, fma = _math(fast)
    a = [a_ref[j, e_sl] for j in range(a_ref.shape[0])]
    bias = bias_ref[e_sl] if has_bias else None
    return bi, ei, si, e_sl, z_sl, exp2, fma, a, thr_ref[e_sl], bias


def _local_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, thr_ref, bias_ref, z_ref, dout_ref,
                  r_ref, ck_ref, cks_ref, hend_ref, gloc_ref, sdt_ref, *, block_e, block_t,
                  seg_steps, length, fast, has_bias, softplus, has_z, z_off):
    """Pass 1: one segment from a zero state. Writes the local state and Σ Δ before each block
    of block_t tokens, the final local state, the adjoint sent out of the segment's start
    (Σ_t (Π_{k<=t} a_k) dy_t C_t) and Σ Δ."""
    f32 = jnp.float32
    bi, ei, si, e_sl, z_sl, exp2, fma, a, thr, bias = _program_block(
        a_ref, thr_ref, bias_ref, block_e=block_e, z_off=z_off, fast=fast, has_bias=has_bias)
    n = len(a)
    zero = jnp.zeros((block_e,), f32)

    def block(k, carry):
        h, prod, g, sdt = carry
        blk = si * seg_steps + k
        for j in range(n):
            ck_ref[bi, blk, j, e_sl] = h[j]
        cks_ref[bi, blk, e_sl] = sdt
        for u in range(block_t):  # unrolled
            t = blk * block_t + u
            delta, _ = _delta(dt_ref[bi, t, e_sl], bias, softplus, thr, t < length, exp2)
            dy, _ = _gate(dout_ref[bi, t, e_sl], z_ref[bi, t, z_sl] if has_z else None, exp2)
            ux = delta * x_ref[bi, t, e_sl].astype(f32)
            decay = _decays(delta, a, r_ref, bi, t, exp2, fma)
            h = [fma(decay[j], h[j], ux * b_ref[bi, t, j]) for j in range(n)]
            prod = [prod[j] * decay[j] for j in range(n)]
            g = [fma(prod[j], dy * c_ref[bi, t, j], g[j]) for j in range(n)]
            sdt = sdt + delta
        return h, prod, g, sdt

    init = ([zero] * n, [jnp.ones((block_e,), f32)] * n, [zero] * n, zero)
    h, _, g, sdt = jax.lax.fori_loop(0, seg_steps, block, init)
    for j in range(n):
        hend_ref[bi, si, j, e_sl] = h[j]
        gloc_ref[bi, si, j, e_sl] = g[j]
    sdt_ref[bi, si, e_sl] = sdt


def _decays(delta, a, r_ref, bi, t, exp2, fma):
    """A token's decays exp2(Δ a_j) [e_blk] per state j; with packed documents exp2(Δ a_j + r_t)
    (`r_ref` [b, l]: 0 at a document's first token)."""
    if r_ref is None:
        return [exp2(delta * aj) for aj in a]
    r = r_ref[bi, t]
    return [exp2(fma(delta, aj, r)) for aj in a]


def _span_decay(aj, sdt, r, exp2, fma):
    """exp2(a_j Σ Δ), the decay over a span of tokens; with packed documents exp2(a_j Σ Δ + r)
    (r = −∞ when a document starts in the span, a scalar)."""
    return exp2(aj * sdt) if r is None else exp2(fma(aj, sdt, r))


def _fold_kernel(a_ref, h0_ref, hend_ref, gloc_ref, sdt_ref, dhf_ref, rs_ref, hs_ref, re_ref,
                 dh0_ref, *, block_e, n_seg, has_init, fast):
    """Pass 2: each segment's initial state (forward) and the adjoint entering its end
    (backward), elementwise over [n, e_blk]; the adjoint leaving segment 0 is d initial_state."""
    f32 = jnp.float32
    bi, ei = pl.program_id(0), pl.program_id(1)
    e_sl = pl.ds(ei * block_e, block_e)
    n = a_ref.shape[0]
    exp2, fma = _math(fast)
    a = [a_ref[j, e_sl] for j in range(n)]

    rs = (lambda s: None) if rs_ref is None else (lambda s: rs_ref[bi, s])

    def forward(s, h):
        sd, r_s = sdt_ref[bi, s, e_sl], rs(s)
        for j in range(n):
            hs_ref[bi, s, j, e_sl] = h[j]
        return [fma(_span_decay(a[j], sd, r_s, exp2, fma), h[j], hend_ref[bi, s, j, e_sl])
                for j in range(n)]

    h0 = ([h0_ref[bi, j, e_sl] for j in range(n)] if has_init
          else [jnp.zeros((block_e,), f32)] * n)
    jax.lax.fori_loop(0, n_seg, forward, h0)

    def backward(i, r):
        s = n_seg - 1 - i
        sd, r_s = sdt_ref[bi, s, e_sl], rs(s)
        for j in range(n):
            re_ref[bi, s, j, e_sl] = r[j]
        return [fma(_span_decay(a[j], sd, r_s, exp2, fma), r[j], gloc_ref[bi, s, j, e_sl])
                for j in range(n)]

    r = jax.lax.fori_loop(0, n_seg, backward, [dhf_ref[bi, j, e_sl] for j in range(n)])
    for j in range(n):
        dh0_ref[bi, j, e_sl] = r[j]


def _main_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, thr_ref, bias_ref, z_ref, dout_ref,
                 ck_ref, cks_ref, hs_ref, re_ref, r_ref, rck_ref,  # inputs
                 dx_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,  # outputs
                 *, block_e, block_t, seg_steps, length, has_d, fast, has_bias, softplus, has_z,
                 z_off):
    """Pass 3: one segment's blocks from the last, each rebuilt from its checkpoint and walked
    backwards with the adjoint in registers."""
    f32 = jnp.float32
    bi, ei, si, e_sl, z_sl, exp2, fma, a, thr, bias = _program_block(
        a_ref, thr_ref, bias_ref, block_e=block_e, z_off=z_off, fast=fast, has_bias=has_bias)
    n = len(a)
    d = d_ref[e_sl] if has_d else None
    zero = jnp.zeros((block_e,), f32)

    def block(i, carry):
        r, acc_a, acc_d, acc_bias = carry
        blk = si * seg_steps + seg_steps - 1 - i
        into = cks_ref[bi, blk, e_sl]  # Σ Δ from the segment start to this block
        r_ck = None if rck_ref is None else rck_ref[bi, blk]
        # the segment's initial state is reloaded (L1) rather than held in registers
        h = [fma(_span_decay(a[j], into, r_ck, exp2, fma), hs_ref[bi, si, j, e_sl],
                 ck_ref[bi, blk, j, e_sl]) for j in range(n)]
        toks = []
        for u in range(block_t):  # the block forward: decays and a_t h_{t-1} kept
            t = blk * block_t + u
            x = x_ref[bi, t, e_sl].astype(f32)
            delta, ddt_scale = _delta(dt_ref[bi, t, e_sl], bias, softplus, thr, t < length,
                                      exp2)
            decay = _decays(delta, a, r_ref, bi, t, exp2, fma)
            q = [decay[j] * h[j] for j in range(n)]  # a_t h_{t-1}
            ux = delta * x
            h = [fma(ux, b_ref[bi, t, j], q[j]) for j in range(n)]
            y = None
            if has_z:  # y before the gate, for dz
                y = h[0] * c_ref[bi, t, 0]
                for j in range(1, n):
                    y = fma(h[j], c_ref[bi, t, j], y)
                if has_d:
                    y = fma(d, x, y)
            toks.append((t, x, delta, ddt_scale, ux, decay, q, y))
        for t, x, delta, ddt_scale, ux, decay, q, y in reversed(toks):
            bt = [b_ref[bi, t, j] for j in range(n)]  # reloaded (L1): fewer registers held
            ct = [c_ref[bi, t, j] for j in range(n)]
            dout = dout_ref[bi, t, e_sl]
            dy, gate = _gate(dout, z_ref[bi, t, z_sl] if has_z else None, exp2)
            if has_z:
                z, sig = gate
                dz = dout.astype(f32) * y * sig * (1.0 + z * (1.0 - sig))
                dz_ref[bi, t, e_sl] = dz.astype(dz_ref.dtype)
            g = [fma(dy, ct[j], r[j]) for j in range(n)]  # G_t
            gb = g[0] * bt[0]
            ga = a[0] * g[0] * q[0]
            for j in range(1, n):
                gb = fma(g[j], bt[j], gb)
                ga = fma(a[j] * g[j], q[j], ga)
            dx = delta * gb
            if has_d:
                dx = fma(d, dy, dx)
            dx_ref[bi, t, e_sl] = dx.astype(dx_ref.dtype)
            d_delta = fma(x, gb, ga * (1.0 / LOG2E))  # a holds A log2(e)
            dv = d_delta * ddt_scale
            ddt_ref[bi, t, e_sl] = dv.astype(ddt_ref.dtype)
            acc_bias = acc_bias + dv
            acc_d = fma(dy, x, acc_d)
            for j in range(n):
                acc_a[j] = fma(delta * g[j], q[j], acc_a[j])
                db_ref[bi, ei, t, j] = jnp.sum(ux * g[j])
                dc_ref[bi, ei, t, j] = jnp.sum(dy * fma(ux, bt[j], q[j]))  # dy h_t
            r = [decay[j] * g[j] for j in range(n)]
        return r, acc_a, acc_d, acc_bias

    r = [re_ref[bi, si, j, e_sl] for j in range(n)]
    r, acc_a, acc_d, acc_bias = jax.lax.fori_loop(
        0, seg_steps, block, (r, [zero] * n, zero, zero))
    for j in range(n):
        da_ref[bi, si, j, e_sl] = acc_a[j]
    dd_ref[bi, si, e_sl] = acc_d
    dbias_ref[bi, si, e_sl] = acc_bias


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("softplus", "interpret", "config"))
def selective_scan_backward(x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, dy,
                            d_final, doc=None, *, softplus, interpret, config):
    """Gradients of `selective_scan_pallas` (same argument contract) for the cotangents dy
    [b, l, e] (of the gated output when z is given) and d_final [b, e, n]; `doc` the document
    index [b, l] int32 of packed documents, or None.

    Returns (dx, d dt, dA, dB, dC, dD, d initial_state, d dt_bias, dz), each in its input's
    dtype and shape (None where the input is None); dz is z's full shape, zero outside the gate's
    columns. A token the filter dropped gets zero gradient through Δ.
    """
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    block_e = min(config.block_e or 32 * config.num_warps, _next_pow2(e))
    block_t = config.block_t or max(1, 64 // n)
    ep = -(-e // block_e) * block_e
    n_blk_e = ep // block_e
    seg_steps = max(1, min(config.segment // block_t, -(-length // block_t)))
    seg = seg_steps * block_t
    n_seg = -(-length // seg)
    padded = n_seg * seg
    pad_e = lambda a, axis: pad_axis(a, axis, ep)
    prep = lambda a: pad_e(pad_time(a, seg), 2)  # [b, l', e']
    xs, douts = prep(x), prep(dy)
    has_bias = dt_bias is not None
    dts = prep(dt if (has_bias or softplus) else dt.astype(f32))  # padding: masked as invalid
    Bs, Cs = (pad_time(a.astype(f32), seg) for a in (B, C))  # [b, l', n]
    At = pad_e(A.astype(f32) * LOG2E, 0).T  # [n, e']
    thr = pad_e(jnp.full((e,), -jnp.inf, f32) if threshold is None else threshold.astype(f32), 0)
    bias = pad_e(dt_bias.astype(f32), 0) if has_bias else jnp.zeros((1,), f32)
    has_d, has_init, has_z = D is not None, initial_state is not None, z is not None
    d = pad_e(D.astype(f32), 0) if has_d else jnp.zeros((1,), f32)
    to_ne = lambda s: pad_e(s.astype(f32), 1).transpose(0, 2, 1)  # [b, e, n] -> [b, n, e']
    h0 = to_ne(initial_state) if has_init else jnp.zeros((1, 1, 1), f32)
    dhf = to_ne(d_final)
    zs, z_off = jnp.zeros((1, 1, 1), x.dtype), 0
    if has_z:
        zs = z
        if padded != length or ep != e:
            zs = prep(gate_input(z, e))
        z_off = zs.shape[-1] - ep
    fast = config.fast_math and not interpret
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    flags = dict(block_e=block_e, fast=fast)
    walk = dict(block_t=block_t, seg_steps=seg_steps, length=length, has_bias=has_bias,
                softplus=softplus, has_z=has_z, z_off=z_off, **flags)
    n_ck = padded // block_t
    packed = doc is not None
    r, rs, rck = [], [], []
    if packed:  # log-offsets: per token, per segment, from each segment's start to each block
        r = [reset_offsets(doc, padded)]  # [b, l']
        seg_starts = np.arange(n_seg) * seg
        rs = [span_offsets(doc, seg_starts, seg_starts + seg)]  # [b, k]
        blk_starts = np.arange(n_ck) * block_t
        rck = [span_offsets(doc, blk_starts // seg * seg, blk_starts)]  # [b, l' / block_t]
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
    ck, cks, hend, gloc, sdt = call(
        with_optional_ref(functools.partial(_local_kernel, **walk), 9, packed),
        grid=(b, n_blk_e, n_seg),
        out_shape=[sds(b, n_ck, n, ep), sds(b, n_ck, ep), sds(b, n_seg, n, ep),
                   sds(b, n_seg, n, ep), sds(b, n_seg, ep)],
        name="selective_scan_bwd_local",
    )(xs, dts, At, Bs, Cs, thr, bias, zs, douts, *r)
    hs, re, dh0 = call(
        with_optional_ref(functools.partial(_fold_kernel, n_seg=n_seg, has_init=has_init,
                                            **flags), 6, packed),
        grid=(b, n_blk_e),
        out_shape=[sds(b, n_seg, n, ep), sds(b, n_seg, n, ep), sds(b, n, ep)],
        name="selective_scan_bwd_fold",
    )(At, h0, hend, gloc, sdt, dhf, *rs)
    dz_shape = (b, padded, ep) if has_z else (1, 1, 1)
    dx, ddt, dz, dB, dC, dA, dD, dbias = call(
        with_optional_ref(with_optional_ref(functools.partial(_main_kernel, has_d=has_d, **walk),
                                            15, packed), 14, packed),
        grid=(b, n_blk_e, n_seg),
        out_shape=[jax.ShapeDtypeStruct((b, padded, ep), x.dtype),
                   jax.ShapeDtypeStruct((b, padded, ep), dts.dtype),
                   jax.ShapeDtypeStruct(dz_shape, z.dtype if has_z else f32),
                   sds(b, n_blk_e, padded, n), sds(b, n_blk_e, padded, n),
                   sds(b, n_seg, n, ep), sds(b, n_seg, ep), sds(b, n_seg, ep)],
        name="selective_scan_bwd",
    )(xs, dts, At, Bs, Cs, d, thr, bias, zs, douts, ck, cks, hs, re, *r, *rck)
    cut = lambda a: a[:, :length, :e]
    dz_full = None
    if has_z:  # the gate is z's last e columns; the others get no gradient
        dz_full = jnp.pad(cut(dz), ((0, 0), (0, 0), (z.shape[-1] - e, 0)))
    return (
        cut(dx),
        cut(ddt).astype(dt.dtype),
        jnp.sum(dA, axis=(0, 1))[:, :e].T.astype(A.dtype),
        jnp.sum(dB, axis=1)[:, :length].astype(B.dtype),
        jnp.sum(dC, axis=1)[:, :length].astype(C.dtype),
        jnp.sum(dD, axis=(0, 1))[:e].astype(D.dtype) if has_d else None,
        dh0[:, :, :e].transpose(0, 2, 1).astype(initial_state.dtype) if has_init else None,
        jnp.sum(dbias, axis=(0, 1))[:e].astype(dt_bias.dtype) if has_bias else None,
        dz_full,
    )
