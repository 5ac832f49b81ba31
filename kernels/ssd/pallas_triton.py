"""Mamba2 SSD scan as one Pallas GPU kernel (Triton lowering), LongMamba filter fused in.

Per head h (scalar A[h], Δ_t[h]), head dim p, state n, group g = h // (H/G):

    S_t[h] = exp(Δ_t[h] A[h]) S_{t-1}[h] + Δ_t[h] x_t[h] ⊗ B_t[g]      # [p, n]
    y_t[h] = S_t[h] C_t[g] + D[h] x_t[h]
    Δ_t[h] := 0 where Δ_t[h] <= threshold[h]        (the folded LongMamba filter)

Design: one program per (batch, head, block of p) walks the sequence chunk by chunk (s tokens)
and carries its slice of the state [p_blk, n] in registers, so chunk states never touch device
memory and every input is read once and y written once. Per chunk, with a_t = Δ_t A and A⁺ its
in-chunk cumsum (the chunked SSD of `ssd_chunked`, as three matmuls):

    y      = ((C Bᵀ) ⊙ exp(A⁺_i − A⁺_j) [j <= i]) (Δ x)  +  exp(A⁺) ⊙ (C Sᵀ)  +  D x
    S_next = exp(A⁺_last) S + ((Δ x) ⊙ exp(A⁺_last − A⁺))ᵀ B

Sequence segments (`SSDPallasConfig.segments`, 2 by default at batch 1): k segments per batch
row, scanned by separate programs, so that two programs share each SM (for a mamba2-1.3b layer
at batch 1, b·h·(p/block_p) = 128 programs alone leave one per SM, latency-bound). A states
pass first walks segments 0..k-2, each split in `state_splits` pieces (so that pass has many
programs too), and writes each piece's local final state from zero and its log-decay Σ Δ A.
XLA folds them in fp32 (one elementwise fusion, S ← exp(Σ Δ A) S + S_piece) into every
segment's initial state, and the scan programs start from those. Measurements behind these
choices: docs/kernels.md, "SSD".

C Bᵀ is computed in the kernel by default (the shared memory then fits two programs per SM);
`precompute_cb` instead computes it once per (chunk, group) with one batched XLA matmul.
Matmul operands are in the input dtype (bf16 inputs: bf16 operands, fp32 accumulation; fp32
inputs: IEEE fp32 dots); Δ, A, the cumsum, the decays and the carried state stay fp32. Decays
are exp2 of base-2 log-decays (A is pre-scaled by log2 e): Pallas lowers exp2 to a shorter
libdevice call than exp (`common.LOG2E`).
Any length is accepted: time is zero-padded to a multiple of s (s·segments with segments; Δ = 0
leaves the state exact), p and n to powers of two >= 16 (Triton tile shapes), only when needed.

Packed documents (`segment_ids`, docs/kernels.md, "Packed documents"): the kernels read each
position's document index d (int32, `common.document_index`) per chunk and keep the in-chunk
matrix only where d_i = d_j, the carried state only where d_i is the document running before the
chunk, the chunk's contribution only from its last document, and 2^A⁺_last S only if the chunk
has no document start (else the log-decay is −∞, also in the states pass's Σ Δ a, so the fold
restarts there). Without segment_ids the kernels are compiled as before (no document input).
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
    document_index,
    with_optional_ref,
)
from longmamba_kernels.ssd.pallas_backward import SSDBackwardConfig, ssd_backward


@dataclasses.dataclass(frozen=True)
class SSDPallasConfig:
    """Block sizes of the SSD kernel.

    Attributes:
      chunk: s, tokens per chunk (power of two >= 16).
      block_p: head-dim rows of the state per program (power of two >= 16; capped at p).
      num_warps: warps per program.
      num_stages: Triton software-pipelining depth of the chunk loop.
      precompute_cb: compute the per-group chunk Gram matrices C Bᵀ [b, c, g, s, s] once with
        one batched XLA matmul (tiny: l·s values per group) instead of in every program. Off
        by default: the [s, s] tile per pipeline stage keeps one program per SM.
      segments: k, sequence segments per batch row (at batch 1; ⌈k / b⌉ for batch b), scanned
        by separate programs, so more programs share the GPU. With
        k > 1 a states pass (no C, no y) computes the local final states and decays of
        segments 0..k-2, and XLA folds them into each segment's initial state.
      min_segment_chunks: fewest chunks per segment (short inputs use fewer segments).
      state_splits: pieces per segment in the states pass, each walked from a zero state by
        its own programs; XLA folds them into the segments' initial states.
      states_block_p: head-dim rows per states-pass program (0: block_p). The states pass
        has no y and no C, so it can afford larger blocks.
      states_t: the states pass carries Sᵀ [n, p] (Bᵀ w: the computed operand needs no
        transpose) instead of S [p, n].
    """

    chunk: int = 64
    block_p: int = 32
    num_warps: int = 4
    num_stages: int = 3
    precompute_cb: bool = False
    segments: int = 2
    min_segment_chunks: int = 16
    state_splits: int = 4
    states_block_p: int = 64
    states_t: bool = True

    def __post_init__(self):
        for name in ("chunk", "block_p", "states_block_p"):
            v = getattr(self, name)
            if name == "states_block_p" and v == 0:
                continue
            if v < 16 or v & (v - 1):
                raise ValueError(f"SSDPallasConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("segments", "min_segment_chunks", "state_splits", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"SSDPallasConfig.{name} must be >= 1, got {getattr(self, name)}")


def _pow2_at_least_16(v: int) -> int:
    return max(16, 1 << (v - 1).bit_length())


def _chunk_inputs(x_ref, dt_ref, b_ref, bi, hi, gi, p_sl, t_sl, a, thr, valid=None):
    """One chunk's x [s, p_blk] (fp32), filtered Δ [s], in-chunk cumsum A⁺ [s] of Δ a (a = A
    log2(e): base-2 log-decays) and its last value, and B [s, n]. `valid` (a traced bool)
    zeroes Δ: a chunk past the program's range then leaves the state exact."""
    f32 = jnp.float32
    x = x_ref[bi, t_sl, hi, p_sl].astype(f32)  # [s, p_blk]
    dt = dt_ref[bi, t_sl, hi].astype(f32)  # [s]
    drop = dt <= thr  # LongMamba filter (thr = -inf: unfiltered)
    if valid is not None:
        drop = drop | jnp.logical_not(valid)
    dt = jnp.where(drop, 0.0, dt)
    da = dt * a  # [s]
    a_cum = jnp.cumsum(da)  # [s]
    a_last = jnp.sum(da)  # A⁺ at the chunk's last token
    bm = b_ref[bi, t_sl, gi, :]  # [s, n]
    return x, dt, a_cum, a_last, bm


def _state_update(s, xdt, a_cum, a_last, bm, dot, dot_dtype, docs=None):
    """S_next = 2^A⁺_last S + ((Δ x) ⊙ 2^(A⁺_last − A⁺))ᵀ B  ([p_blk, n], fp32); with `docs`
    (`common.chunk_documents`) only the last document's tokens enter and S passes only
    through a chunk without a document start."""
    to_end = jnp.exp2(a_last - a_cum)  # [s]
    a_thru = a_last
    if docs is not None:
        _, _, tail, through = docs
        to_end = jnp.where(tail, to_end, 0.0)
        a_thru = jnp.where(through, a_last, -jnp.inf)
    w = (xdt * to_end[:, None]).astype(dot_dtype)  # [s, p_blk]
    return jnp.exp2(a_thru) * s + dot(w.T, bm.astype(dot_dtype))


def _dot(dot_dtype):
    # fp32 inputs get IEEE fp32 dots; bf16 operands accumulate in fp32 at default precision.
    prec = jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    return functools.partial(jnp.dot, precision=prec, preferred_element_type=jnp.float32)


def _ssd_states_kernel(
    x_ref, dt_ref, a_ref, b_ref, thr_ref, doc_ref, sl_ref, la_ref,
    *, chunk, block_p, seg_chunks, sub_chunks, splits, n_prev, heads_per_group, dot_dtype,
    transposed,
):
    """Pass 1 of a segmented scan: one program per (batch row, segment q < k-1, split j) ×
    head × block of p. It walks chunks [q·seg + j·sub, min(q·seg + (j+1)·sub, (q+1)·seg)) from
    a zero state and writes that local state and its base-2 log-decay Σ Δ a (broadcast over
    p; −∞ when a document starts in the piece)."""
    f32 = jnp.float32
    pid0, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, rest = pid0 // (n_prev * splits), pid0 % (n_prev * splits)
    qi, ji = rest // splits, rest % splits
    gi = hi // heads_per_group
    p_sl = pl.ds(pi * block_p, block_p)
    n = b_ref.shape[-1]
    dot = _dot(dot_dtype)
    a, thr = a_ref[hi], thr_ref[hi]
    ragged = sub_chunks * splits != seg_chunks  # the last split overruns into the next segment

    def body(ci, carry):
        s, a_tot = carry
        local = ji * sub_chunks + ci  # chunk index within the segment
        t_sl = pl.ds((qi * seg_chunks + local) * chunk, chunk)
        valid = local < seg_chunks if ragged else None
        x, dt, a_cum, a_last, bm = _chunk_inputs(
            x_ref, dt_ref, b_ref, bi, hi, gi, p_sl, t_sl, a, thr, valid)
        docs = None
        if doc_ref is not None:
            docs = chunk_documents(doc_ref, bi, (qi * seg_chunks + local) * chunk, chunk, valid)
        if transposed:  # Sᵀ [n, p_blk] = 2^A⁺_last Sᵀ + Bᵀ w: w needs no transpose
            to_end = jnp.exp2(a_last - a_cum)  # [s]
            a_thru = a_last
            if docs is not None:
                to_end = jnp.where(docs[2], to_end, 0.0)
                a_thru = jnp.where(docs[3], a_last, -jnp.inf)
            w = (x * (dt * to_end)[:, None]).astype(dot_dtype)  # [s, p_blk]
            s = jnp.exp2(a_thru) * s + dot(bm.astype(dot_dtype).T, w)
        else:
            s = _state_update(s, x * dt[:, None], a_cum, a_last, bm, dot, dot_dtype, docs)
            a_thru = a_last if docs is None else jnp.where(docs[3], a_last, -jnp.inf)
        return s, a_tot + a_thru

    shape = (n, block_p) if transposed else (block_p, n)
    init = (jnp.zeros(shape, f32), jnp.zeros((), f32))
    s, a_tot = jax.lax.fori_loop(0, sub_chunks, body, init)
    sl_ref[pid0, hi, p_sl, :] = s.T if transposed else s
    la_ref[pid0, hi, p_sl] = jnp.full((block_p,), a_tot, f32)


def _ssd_kernel(
    x_ref, dt_ref, a_ref, b_ref, c_ref, cb_ref, d_ref, thr_ref, s0_ref, doc_ref, y_ref, s_ref,
    *, chunk, block_p, seg_chunks, n_seg, heads_per_group, has_d, has_init, dot_dtype,
    precompute_cb,
):
    """The scan: one program per (batch row, segment) × head × block of p, over `seg_chunks`
    chunks, from its initial state s0[row, segment] (segment > 0: the folded states pass);
    with `doc_ref`, packed documents (`common.chunk_documents`)."""
    f32 = jnp.float32
    pid0, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, ki = pid0 // n_seg, pid0 % n_seg
    gi = hi // heads_per_group
    p_sl = pl.ds(pi * block_p, block_p)
    n = b_ref.shape[-1]
    dot = _dot(dot_dtype)
    a, thr = a_ref[hi], thr_ref[hi]
    idx = jnp.arange(chunk)
    causal = idx[:, None] >= idx[None, :]  # [i, j]: j <= i
    if has_init:
        s = s0_ref[pid0, hi, p_sl, :].astype(f32)  # [p_blk, n]
    else:
        s = jnp.zeros((block_p, n), f32)

    def body(ci, s):
        t_sl = pl.ds((ki * seg_chunks + ci) * chunk, chunk)
        x, dt, a_cum, a_last, bm = _chunk_inputs(
            x_ref, dt_ref, b_ref, bi, hi, gi, p_sl, t_sl, a, thr)
        cm = c_ref[bi, t_sl, gi, :]  # [s, n]
        link, docs = causal, None
        if doc_ref is not None:  # j feeds i only inside one document
            docs = chunk_documents(doc_ref, bi, (ki * seg_chunks + ci) * chunk, chunk)
            link = causal & (docs[0][:, None] == docs[0][None, :])
        seg = jnp.where(link, a_cum[:, None] - a_cum[None, :], -jnp.inf)  # [i, j]
        if precompute_cb:
            cb = cb_ref[bi, ki * seg_chunks + ci, gi].astype(f32)  # [s, s]
        else:
            cb = dot(cm.astype(dot_dtype), bm.astype(dot_dtype).T)  # [s, s]
        m = (cb * jnp.exp2(seg)).astype(dot_dtype)
        xdt = x * dt[:, None]  # [s, p_blk]
        y = dot(m, xdt.astype(dot_dtype))  # [s, p_blk] intra-chunk
        y_off = dot(cm.astype(dot_dtype), s.T.astype(dot_dtype))  # [s, p_blk] carried state
        carried = jnp.exp2(a_cum)  # [s]: decay of the entering state
        if docs is not None:
            carried = jnp.where(docs[1], carried, 0.0)
        y = y + carried[:, None] * y_off
        if has_d:
            y = y + d_ref[hi] * x
        y_ref[bi, t_sl, hi, p_sl] = y.astype(y_ref.dtype)
        return _state_update(s, xdt, a_cum, a_last, bm, dot, dot_dtype, docs)

    s = jax.lax.fori_loop(0, seg_chunks, body, s)
    s_ref[pid0, hi, p_sl, :] = s


def _fold_segment_states(s0, s_sub, la, n_seg, splits):
    """Every segment's initial state from the states pass's pieces (fp32).

    s0: [b, h, p, n] or None. s_sub: [b, J, h, p, n], la: [b, J, h]: the pieces' local final
    states and base-2 log-decays Σ Δ a (−∞ for a piece where a document starts: its S_sub is
    that document's state), J = (k-1)·splits in sequence order. S ← 2^la_j S + S_sub[j] piece
    by piece; segment k starts from S after piece k·splits (segment 0: s0).
    A Python loop over the J pieces (a few), so XLA fuses it into one elementwise pass.
    Returns [b, k, h, p, n]."""
    s = jnp.zeros_like(s_sub[:, 0]) if s0 is None else s0
    out = [s]
    for j in range(s_sub.shape[1]):
        s = jnp.exp2(la[:, j])[..., None, None] * s + s_sub[:, j]
        if (j + 1) % splits == 0:
            out.append(s)
    return jnp.stack(out[:n_seg], axis=1)


def ssd_pallas(
    x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, segment_ids=None,
    interpret=False, config=None, y_dtype=None, backward_config=None,
):
    """Mamba2 SSD scan, Pallas kernel. Same contract as `ssd_reference`.

    Args:
      x: [b, l, h, p] fp32 or bf16. dt: [b, l, h] Δ after softplus (fp32). A: [h] fp32.
      B, C: [b, l, g, n] (head i reads group i // (h/g)). D: [h] or None.
      initial_state: [b, h, p, n] or None. threshold: [h] fp32 folded filter or None.
      segment_ids: [b, l] int or None: packed documents (the state restarts from zero where
        the id changes; the first document continues initial_state).
      interpret: run through the Pallas interpreter (any platform).
      config: `SSDPallasConfig` (block sizes); None for the defaults.
      y_dtype: dtype y is written in (None: fp32). The accumulation is fp32 either way; bf16
        halves y's bytes, the largest of the kernel's memory traffic (what the official
        mamba_ssm kernel returns for bf16 inputs).
      backward_config: `SSDBackwardConfig` of the gradient kernels; None for the defaults.
        Differentiable in x, dt, A, B, C, D, initial_state (and through the final state).

    Returns:
      (y [b, l, h, p] in y_dtype, final_state [b, h, p, n] fp32).
    """
    config = SSDPallasConfig() if config is None else config
    backward_config = SSDBackwardConfig() if backward_config is None else backward_config
    y_dtype = jnp.dtype(jnp.float32 if y_dtype is None else y_dtype)
    if not jnp.issubdtype(y_dtype, jnp.floating):
        raise ValueError(f"ssd_pallas y_dtype must be a floating dtype, got {y_dtype}")
    doc = None if segment_ids is None else document_index(segment_ids)  # [b, l] int32
    return _ssd_differentiable(x, dt, A, B, C, D, initial_state, threshold, doc,
                               bool(interpret), config, y_dtype, backward_config)


# Gradients: the forward above runs unchanged (no extra outputs) and its inputs are the only
# residuals; the backward kernels recompute the chunk states (`pallas_backward.py`,
# docs/kernels.md, "Backward passes"). The threshold and the document index get no gradient.
@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _ssd_differentiable(x, dt, A, B, C, D, s0, thr, doc, interpret, config, y_dtype,
                        bwd_config):
    return _ssd_pallas(x, dt, A, B, C, D, s0, thr, doc, interpret=interpret, config=config,
                       y_dtype=y_dtype)


def _ssd_differentiable_fwd(x, dt, A, B, C, D, s0, thr, doc, interpret, config, y_dtype,
                            bwd_config):
    out = _ssd_pallas(x, dt, A, B, C, D, s0, thr, doc, interpret=interpret, config=config,
                      y_dtype=y_dtype)
    return out, (x, dt, A, B, C, D, s0, thr, doc)


def _ssd_differentiable_bwd(interpret, config, y_dtype, bwd_config, residuals, cotangents):
    x, dt, A, B, C, D, s0, thr, doc = residuals
    dy, d_final = cotangents
    grads = ssd_backward(x, dt, A, B, C, D, s0, thr, dy, d_final, doc, interpret=interpret,
                         config=bwd_config)
    return (*grads, None if thr is None else jnp.zeros_like(thr), None)


_ssd_differentiable.defvjp(_ssd_differentiable_fwd, _ssd_differentiable_bwd)


def ssd_segments(batch: int, length: int, config: SSDPallasConfig) -> int:
    """Number of sequence segments the kernel uses for this batch size and length."""
    n_chunks = -(-length // config.chunk)
    per_row = -(-config.segments // max(batch, 1))
    return max(1, min(per_row, n_chunks // config.min_segment_chunks))


@functools.partial(jax.jit, static_argnames=("interpret", "config", "y_dtype"))
def _ssd_pallas(x, dt, A, B, C, D, initial_state, threshold, doc, *, interpret, config,
                y_dtype):
    f32 = jnp.float32
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    if dt.shape != (b, length, h) or A.shape != (h,) or B.shape != (b, length, g, n):
        raise ValueError(
            f"ssd_pallas shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}"
        )
    dot_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else f32
    if dot_dtype == f32:
        B, C = B.astype(f32), C.astype(f32)
    chunk = config.chunk
    pp, np_ = _pow2_at_least_16(p), _pow2_at_least_16(n)
    block_p = min(config.block_p, pp)
    n_seg = ssd_segments(b, length, config)
    n_chunks = -(-length // chunk)
    seg_chunks = -(-n_chunks // n_seg)  # chunks per segment (the last may be partly padding)
    padded_len = seg_chunks * n_seg * chunk

    pad_t = lambda a: jnp.pad(a, [(0, padded_len - length if i == 1 else 0)
                                  for i in range(a.ndim)]) if padded_len != length else a
    xs = pad_t(x)  # [b, l', h, p]
    if pp != p:
        xs = jnp.pad(xs, ((0, 0), (0, 0), (0, 0), (0, pp - p)))
    dts = pad_t(dt.astype(f32))  # [b, l', h]; Δ = 0 on padding leaves the state exact
    Bs, Cs = pad_t(B), pad_t(C)  # [b, l', g, n]
    if np_ != n:
        pad_n = ((0, 0), (0, 0), (0, 0), (0, np_ - n))
        Bs, Cs = jnp.pad(Bs, pad_n), jnp.pad(Cs, pad_n)  # [b, l', g, n']
    has_d, has_init = D is not None, initial_state is not None
    packed = doc is not None
    if packed:  # padding joins the last document (Δ = 0 there: the state is exact)
        doc = jnp.pad(doc, ((0, 0), (0, padded_len - length)), mode="edge")  # [b, l']
    # Constants and placeholders as numpy arrays: XLA literals, not broadcast kernels.
    d = D.astype(f32) if has_d else np.zeros((h,), np.float32)
    # The compare always runs (no filter: -inf, never true): one code path for both, and on
    # the H100 the variant without it compiled to a slower kernel (docs/kernels.md, "SSD").
    thr = np.full((h,), -np.inf, np.float32) if threshold is None else threshold.astype(f32)
    if has_init:
        s0 = initial_state.astype(f32)
        s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, pp - p), (0, np_ - n)))  # [b, h, p', n']
    else:
        s0 = np.zeros((1, 1, 1, 1), np.float32)  # unused placeholder

    if config.precompute_cb:
        nc = padded_len // chunk
        to_chunks = lambda a: a.reshape(b, nc, chunk, g, np_)  # [b, c, s, g, n']
        prec = jax.lax.Precision.HIGHEST if dot_dtype == f32 else None
        cb = jnp.einsum(
            "bcigk,bcjgk->bcgij", to_chunks(Cs), to_chunks(Bs), precision=prec,
            preferred_element_type=f32,
        ).astype(dot_dtype)  # [b, c, g, s, s]
    else:
        cb = np.zeros((1, 1, 1, 1, 1), dot_dtype)  # unused placeholder
    a2 = A.astype(f32) * np.float32(LOG2E)  # base-2 decays in the kernels
    if n_seg > 1:
        s0 = _segment_initial_states(
            xs, dts, a2, Bs, thr, s0 if has_init else None, doc, n_seg=n_seg,
            seg_chunks=seg_chunks, block_p=block_p, dot_dtype=dot_dtype, config=config,
            interpret=interpret,
        )  # [b·k, h, p', n']
        has_init = True
    y, s = pl.pallas_call(
        with_optional_ref(functools.partial(
            _ssd_kernel, chunk=chunk, block_p=block_p, seg_chunks=seg_chunks, n_seg=n_seg,
            heads_per_group=h // g, has_d=has_d, has_init=has_init, dot_dtype=dot_dtype,
            precompute_cb=config.precompute_cb,
        ), 9, packed),
        grid=(b * n_seg, h, pp // block_p),
        out_shape=[
            jax.ShapeDtypeStruct((b, padded_len, h, pp), y_dtype),
            jax.ShapeDtypeStruct((b * n_seg, h, pp, np_), f32),
        ],
        compiler_params=_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="ssd_chunk_scan",
    )(xs, dts, a2, Bs, Cs, cb, d, thr, s0, *([doc] if packed else []))
    s = s.reshape(b, n_seg, h, pp, np_)[:, -1]  # the last segment's final state
    return y[:, :length, :, :p], s[:, :, :p, :n]


def _segment_initial_states(
    xs, dts, a2, Bs, thr, s0, doc, *, n_seg, seg_chunks, block_p, dot_dtype, config,
    interpret,
):
    """The states pass and its fold: every segment's initial state, [b·k, h, p, n] fp32.

    Inputs are the kernel's (padded to k·seg_chunks chunks, p and n to tile sizes); s0 is
    [b, h, p, n] or None; doc the padded document index [b, l'] or None. Segments 0..k-2
    are each split in `state_splits` programs that walk their piece from a zero state; XLA
    folds the pieces' states into each segment's initial state (`_fold_segment_states`)."""
    f32 = jnp.float32
    b, _, h, pp = xs.shape
    g, np_ = Bs.shape[-2:]
    block_p = min(config.states_block_p or block_p, pp)
    splits = min(config.state_splits, seg_chunks)
    sub_chunks = -(-seg_chunks // splits)
    rows = b * (n_seg - 1) * splits
    packed = doc is not None
    s_sub, la = pl.pallas_call(
        with_optional_ref(functools.partial(
            _ssd_states_kernel, chunk=config.chunk, block_p=block_p, seg_chunks=seg_chunks,
            sub_chunks=sub_chunks, splits=splits, n_prev=n_seg - 1, heads_per_group=h // g,
            dot_dtype=dot_dtype, transposed=config.states_t,
        ), 5, packed),
        grid=(rows, h, pp // block_p),
        out_shape=[
            jax.ShapeDtypeStruct((rows, h, pp, np_), f32),
            jax.ShapeDtypeStruct((rows, h, pp), f32),
        ],
        compiler_params=_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="ssd_segment_states",
    )(xs, dts, a2, Bs, thr, *([doc] if packed else []))
    s_sub = s_sub.reshape(b, rows // b, h, pp, np_)
    la = la[..., 0].reshape(b, rows // b, h)
    s_in = _fold_segment_states(s0, s_sub, la, n_seg, splits)  # [b, k, h, p, n]
    return s_in.reshape(b * n_seg, h, pp, np_)


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
