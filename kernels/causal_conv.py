"""Depthwise causal conv1d over time (+ bias, + silu), as one Pallas GPU kernel for prefill.

    ys, state = causal_conv1d(src, weight, bias, offset=E, splits=(E, gn, gn),
                              activation="silu", out_dtype=jnp.bfloat16, implementation="pallas")

y_t[c] = act(Σ_k weight[k, c] · x_{t−K+1+k}[c] + bias[c]), with x the K−1 inputs of
`initial_state` (zeros when None) before the first token. Both mixers run it right after
in_proj, on a block of in_proj's output columns: Mamba-1 on x (the first e columns of [x | z]),
Mamba2 on xBC (columns E … E + conv_dim of [z | xBC | dt]).

Implementations: "reference" (jnp; fp32 math, what `longmamba_jax.layers.CausalConv1d` has
always computed) and "pallas" (Triton lowering; `interpret=True` runs it through the Pallas
interpreter on any platform). The kernel:
- reads its channels in place from the wider source array (`offset`), so no slice is copied;
- writes its output already split (`splits`), e.g. Mamba2's x, B and C as three arrays, so no
  slice of the output is copied either (a program's channel block lies in one piece);
- evaluates in fp32 in the reference's order (taps k = 0 … K−1, then the bias, then silu), and
  rounds once to `out_dtype`.
Why: XLA compiles the jnp form to a fusion that converts the window to fp32 and pads it. At
mamba2-1.3b's shapes and 16K tokens on an H100 that takes 0.187 ms a layer, this kernel 0.149
and causal_conv1d's CUDA kernel 0.118 (the floor is 0.097; docs/kernels.md, "Causal conv").
Each tap loads its shifted window on its own (L1 hits), which
is where the rest to the floor goes. The final state (the last K−1 inputs, fp32) is a slice the
wrapper takes in XLA.
Packed documents (`segment_ids`): the kernels also read, per token, the position where its
document starts (int32; −(K−1) for the first document, whose window may reach into
initial_state), and each tap reads a token only from there on: one load and a compare per tap.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from longmamba_kernels.common import check_segment_ids, document_index, with_optional_ref

f32 = jnp.float32

ACTIVATIONS = (None, "silu")


def supported_splits(splits, block_c: int) -> bool:
    """Whether the Pallas kernel can write outputs of these widths: each a multiple of block_c."""
    return all(w % block_c == 0 for w in splits)


def default_block_c(splits) -> int:
    """The widest power-of-two channel block (≤ 128, ≥ 16) dividing every output width, or 0."""
    for bc in (128, 64, 32, 16):
        if supported_splits(splits, bc):
            return bc
    return 0


def causal_conv1d(src, weight, bias=None, *, initial_state=None, offset: int = 0,
                  splits=None, activation=None, out_dtype=None, segment_ids=None,
                  lengths=None, implementation="reference", interpret: bool = False,
                  block_t: int = 64, num_warps: int = 8):
    """Depthwise causal conv of channels `offset … offset + C` of `src` along time.

    Args:
      src: [b, l, W] (any float dtype); the conv reads columns offset … offset + C, C =
        weight.shape[1].
      weight: [K, C] taps (tap K−1 multiplies the current token).
      bias: [C] or None.
      initial_state: [b, K−1, C], the inputs before the first token, or None (zeros).
      offset: the first column of src that the conv reads.
      splits: output widths summing to C (default (C,)); the output comes back as that many
        arrays [b, l, w_i], channel order kept.
      activation: None or "silu".
      out_dtype: the outputs' dtype (default src's).
      segment_ids: [b, l] int or None: packed documents (`common.document_index`); a token's
        window holds only earlier tokens of its own document (the first document also reads
        initial_state), as if each document ran alone.
      lengths: [b] int or None: row i's final state is the K−1 inputs before position
        lengths[i] (a right-padded batch: each row's state at its own last real token).
      implementation: "reference" | "pallas".
      interpret: run the Pallas kernel through the interpreter; only for "pallas".
      block_t: tokens per program (Pallas).
      num_warps: warps per program (Pallas).

    Returns:
      (tuple of outputs, one per split; final state [b, K−1, C] fp32: the last K−1 inputs,
      earlier ones taken from initial_state when l < K−1).
    """
    b, length, width = src.shape
    k, c = weight.shape
    splits = (c,) if splits is None else tuple(int(w) for w in splits)
    out_dtype = jnp.dtype(src.dtype if out_dtype is None else out_dtype)
    if offset < 0 or offset + c > width:
        raise ValueError(
            f"causal_conv1d: channels {offset} … {offset + c} (offset {offset}, weight "
            f"{weight.shape}) do not fit in src of width {width} (src {src.shape})"
        )
    if bias is not None and bias.shape != (c,):
        raise ValueError(
            f"causal_conv1d: bias {bias.shape} must be ({c},) for weight {weight.shape}"
        )
    if initial_state is not None and initial_state.shape != (b, k - 1, c):
        raise ValueError(
            f"causal_conv1d: initial_state {initial_state.shape} must be {(b, k - 1, c)}"
        )
    if sum(splits) != c or min(splits) <= 0:
        raise ValueError(f"causal_conv1d: splits {splits} must be positive and sum to {c}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation {activation!r} not in {ACTIVATIONS}")
    if length == 0:
        raise ValueError("causal_conv1d: src has no tokens (l = 0)")
    segment_ids = check_segment_ids(segment_ids, b, length)
    x = jax.lax.slice_in_dim(src, offset, offset + c, axis=2)
    state = _final_state(x, initial_state, k, segment_ids, lengths)
    if implementation == "reference":
        y = _reference(x, weight, bias, initial_state, activation, segment_ids)
        y = y.astype(out_dtype)
        bounds = [sum(splits[:i]) for i in range(len(splits) + 1)]
        return tuple(y[..., lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)), state
    if implementation != "pallas":
        raise ValueError(
            f"causal_conv1d: unknown implementation {implementation!r} "
            "(expected 'reference' or 'pallas')"
        )
    block_c = default_block_c(splits)
    if not block_c:
        raise ValueError(
            f"causal_conv1d(implementation='pallas') needs every output width to be a multiple "
            f"of 16; got splits {splits}: use 'reference'"
        )
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"causal_conv1d: block_t must be a power of two, got {block_t}")
    static = _Static(offset=offset, splits=splits, activation=activation, out_dtype=out_dtype,
                     interpret=bool(interpret),
                     block_t=min(block_t, max(16, 1 << (length - 1).bit_length())),
                     block_c=block_c, num_warps=num_warps)
    first = None if segment_ids is None else document_firsts(segment_ids, k)
    return _differentiable(src, weight, bias, initial_state, first, static), state


def document_firsts(segment_ids, k):
    """int32 [b, l]: the position where each token's document starts, −(K−1) for the first
    document (its window reaches into the initial state): tap i of token t reads position
    t − K + 1 + i only if that is >= first[t]."""
    doc = document_index(segment_ids)
    pos = jnp.arange(doc.shape[1], dtype=jnp.int32)
    start = jnp.concatenate([jnp.zeros_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(start, pos, 0), axis=1)
    return jnp.where(doc == 0, -(k - 1), first).astype(jnp.int32)


def _window_docs(segment_ids, k):
    """Document index of every window slot: int32 [b, K−1+l], the K−1 initial-state slots in
    document 0 (the one the initial state belongs to)."""
    doc = document_index(segment_ids)
    return jnp.concatenate([jnp.zeros((doc.shape[0], k - 1), doc.dtype), doc], axis=1)


def _final_state(x, initial_state, k, segment_ids=None, lengths=None):
    """The last K−1 inputs in fp32 (what the next chunk or decode step reads): those before
    position lengths[i] of row i when given; with packed documents, inputs of documents
    before the one the state ends in read as zeros."""
    b, length, c = x.shape
    prev = jnp.zeros((b, k - 1, c), f32) if initial_state is None else initial_state.astype(f32)
    full = jnp.concatenate([prev, x.astype(f32)], axis=1)  # [b, K−1+l, c]
    if lengths is None and segment_ids is None:
        return full[:, length:]
    if lengths is None:
        lengths = jnp.full((b,), length, jnp.int32)
    # slots lengths[i] … lengths[i] + K − 2 of `full` are the inputs before position lengths[i]
    idx = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(k - 1)  # [b, K−1]
    out = jnp.take_along_axis(full, idx[..., None], axis=1)
    if segment_ids is not None and k > 1:
        docs = jnp.take_along_axis(_window_docs(segment_ids, k), idx, axis=1)  # [b, K−1]
        out = jnp.where((docs == docs[:, -1:])[..., None], out, 0.0)
    return out


def _reference(x, weight, bias, initial_state, activation, segment_ids=None):
    """The jnp form, fp32: the sum of the K shifted windows in tap order, the bias, silu."""
    b, length, c = x.shape
    k = weight.shape[0]
    state = jnp.zeros((b, k - 1, c), f32) if initial_state is None else initial_state
    full = jnp.concatenate([state.astype(f32), x.astype(f32)], axis=1)  # [b, K−1+l, c]
    if segment_ids is None:
        y = sum(full[:, i : i + length] * weight[i].astype(f32) for i in range(k))
    else:  # tap i reads slot t + i; it counts only inside the token's own document
        docs = _window_docs(segment_ids, k)
        own = docs[:, k - 1:]  # [b, l]
        y = sum(jnp.where((docs[:, i : i + length] == own)[..., None],
                          full[:, i : i + length], 0.0) * weight[i].astype(f32)
                for i in range(k))
    if bias is not None:
        y = y + bias.astype(f32)
    if activation == "silu":
        y = y * jax.nn.sigmoid(y)
    return y


def _firsts(f_ref, pb, tt, length):
    """first[tt] (`document_firsts`) of this row at positions tt [T], clipped into range."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(f_ref.at[pb, jnp.clip(tt, 0, length - 1)])


def _kernel(src_ref, w_ref, b_ref, s_ref, f_ref, *o_refs, k, length, offset, starts, block_t,
            block_c, has_bias, has_state, activation):
    from jax.experimental.pallas import triton as plgpu

    pb, pt, pc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = pt * block_t + jnp.arange(block_t, dtype=jnp.int32)  # [T] this block's tokens
    ch = pc * block_c + jnp.arange(block_c, dtype=jnp.int32)  # [C'] channels of the conv
    col = ch + offset  # their columns in src
    own = None if f_ref is None else _firsts(f_ref, pb, t, length)  # [T] documents' starts
    acc = jnp.zeros((block_t, block_c), f32)
    for i in range(k):
        src_t = t + (i - (k - 1))  # [T] the token tap i reads (negative: initial state)
        in_x = (src_t >= 0) & (src_t < length)
        if own is not None:  # only inside the token's own document
            in_x = in_x & (src_t >= own)
        # indices clamped in range, values masked: no load ever leaves the array
        xi = plgpu.load(
            src_ref.at[pb, jnp.clip(src_t, 0, length - 1)[:, None], col[None, :]],
            mask=in_x[:, None], other=0.0,
        ).astype(f32)
        if has_state and i < k - 1:
            in_s = src_t < 0 if own is None else (src_t < 0) & (src_t >= own)
            si = plgpu.load(
                s_ref.at[pb, jnp.clip(src_t + (k - 1), 0, k - 2)[:, None], ch[None, :]],
                mask=in_s[:, None], other=0.0,
            ).astype(f32)
            xi = jnp.where(in_s[:, None], si, xi)
        acc = acc + xi * w_ref[i, pl.ds(pc * block_c, block_c)].astype(f32)[None, :]
    if has_bias:
        acc = acc + b_ref[pl.ds(pc * block_c, block_c)].astype(f32)[None, :]
    if activation == "silu":
        acc = acc * jax.nn.sigmoid(acc)
    t_ok = (t < length)[:, None]
    for j, o_ref in enumerate(o_refs):  # the output this channel block belongs to
        lo, hi = starts[j], starts[j + 1]

        @pl.when((pc * block_c >= lo) & (pc * block_c < hi))
        def _(o_ref=o_ref, lo=lo):
            # rows past the end are masked (Triton) and dropped as out of range (interpreter);
            # clipping them onto the last row would let the interpreter's masked write of the
            # old value land there
            plgpu.store(o_ref.at[pb, t[:, None], (ch - lo)[None, :]], acc.astype(o_ref.dtype),
                        mask=t_ok)


@functools.partial(jax.jit, static_argnames=(
    "offset", "splits", "activation", "out_dtype", "interpret", "block_t", "block_c",
    "num_warps"))
def _pallas(src, weight, bias, initial_state, first, *, offset, splits, activation, out_dtype,
            interpret, block_t, block_c, num_warps):
    from jax.experimental.pallas import triton as plgpu

    b, length, _ = src.shape
    k, c = weight.shape
    has_bias, has_state = bias is not None, initial_state is not None
    starts = tuple(sum(splits[:i]) for i in range(len(splits) + 1))
    return pl.pallas_call(
        with_optional_ref(functools.partial(
            _kernel, k=k, length=length, offset=offset, starts=starts, block_t=block_t,
            block_c=block_c, has_bias=has_bias, has_state=has_state, activation=activation,
        ), 4, first is not None),
        grid=(b, pl.cdiv(length, block_t), c // block_c),
        out_shape=[jax.ShapeDtypeStruct((b, length, w), out_dtype) for w in splits],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="causal_conv1d",
    )(src, weight, bias if has_bias else np.zeros((1,), np.float32),
      initial_state if has_state else np.zeros((1, 1, 1), np.float32),  # unused placeholders
      *([] if first is None else [first]))


# ------------------------------------------------------------------------------ gradients
@dataclasses.dataclass(frozen=True)
class _Static:
    offset: int
    splits: tuple
    activation: str | None
    out_dtype: jnp.dtype
    interpret: bool
    block_t: int
    block_c: int
    num_warps: int


def _forward(src, weight, bias, initial_state, first, st):
    return tuple(_pallas(src, weight, bias, initial_state, first, offset=st.offset,
                         splits=st.splits,
                         activation=st.activation, out_dtype=st.out_dtype,
                         interpret=st.interpret, block_t=st.block_t, block_c=st.block_c,
                         num_warps=st.num_warps))


# The forward kernel runs unchanged; its inputs are the residuals and the backward kernel
# recomputes the pre-activations (docs/kernels.md, "Backward passes"). The final state (a slice
# of the inputs, taken in XLA) is differentiated by XLA. `first` (packed documents) gets none.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _differentiable(src, weight, bias, initial_state, first, st):
    return _forward(src, weight, bias, initial_state, first, st)


def _differentiable_fwd(src, weight, bias, initial_state, first, st):
    out = _forward(src, weight, bias, initial_state, first, st)
    return out, (src, weight, bias, initial_state, first)


def _differentiable_bwd(st, residuals, cotangents):
    src, weight, bias, initial_state, first = residuals
    grads = _backward(src, weight, bias, initial_state, first, tuple(cotangents),
                      offset=st.offset, splits=st.splits, activation=st.activation,
                      interpret=st.interpret, block_t=st.block_t, block_c=st.block_c,
                      num_warps=st.num_warps)
    return (*grads, None)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _backward_kernel(src_ref, w_ref, b_ref, s_ref, f_ref, *refs, k, length, offset, starts,
                     block_t, block_c, has_bias, has_state, activation):
    """One block of rows × channels. Row r stands for input position t = r − (K−1) (negative:
    the initial state), whose gradient is Σ_m w[K−1−m] · dpre_{t+m}, with dpre_t = dy_t ·
    act'(pre_t) and pre_t recomputed; the rows' own dpre also give this block's parts of
    dweight and dbias. With packed documents (`f_ref`, `document_firsts`) output t + m reads
    input t only if t >= first[t + m]."""
    from jax.experimental.pallas import triton as plgpu

    n_out = len(starts) - 1
    dy_refs, (dx_ref, ds_ref, dw_ref, db_ref) = refs[:n_out], refs[n_out:]
    pb, pt, pc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = pt * block_t - (k - 1) + jnp.arange(block_t, dtype=jnp.int32)  # [T] input positions
    ch = pc * block_c + jnp.arange(block_c, dtype=jnp.int32)  # [C'] conv channels
    c_sl = pl.ds(pc * block_c, block_c)
    w = [w_ref[i, c_sl].astype(f32)[None, :] for i in range(k)]

    def firsts(tt):
        return None if f_ref is None else _firsts(f_ref, pb, tt, length)

    def window(tt, own=None):
        """x̃ at positions tt [T] (negative: the initial state; zeros outside, and before
        `own`, the start of the reading token's document): [T, C']."""
        in_x = (tt >= 0) & (tt < length)
        if own is not None:
            in_x = in_x & (tt >= own)
        v = plgpu.load(src_ref.at[pb, jnp.clip(tt, 0, length - 1)[:, None],
                                  (ch + offset)[None, :]],
                       mask=in_x[:, None], other=0.0).astype(f32)
        if has_state:
            in_s = (tt < 0) & (tt >= -(k - 1))
            if own is not None:
                in_s = in_s & (tt >= own)
            sv = plgpu.load(s_ref.at[pb, jnp.clip(tt + (k - 1), 0, k - 2)[:, None], ch[None, :]],
                            mask=in_s[:, None], other=0.0).astype(f32)
            v = jnp.where(in_s[:, None], sv, v)
        return v

    def dpre(tt, dy_ref, lo, own=None):
        """dL/dpre at outputs tt [T] (zero outside 0 … l−1); pre recomputed tap by tap (`own`:
        firsts(tt), with packed documents)."""
        pre = window(tt - (k - 1), own) * w[0]
        for i in range(1, k):
            pre = pre + window(tt + (i - (k - 1)), own) * w[i]
        if has_bias:
            pre = pre + b_ref[c_sl].astype(f32)[None, :]
        ok = (tt >= 0) & (tt < length)
        g = plgpu.load(dy_ref.at[pb, jnp.clip(tt, 0, length - 1)[:, None], (ch - lo)[None, :]],
                       mask=ok[:, None], other=0.0).astype(f32)
        if activation == "silu":
            sig = jax.nn.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        return g

    for j, dy_ref in enumerate(dy_refs):  # the cotangent this channel block belongs to
        lo, hi = starts[j], starts[j + 1]

        @pl.when((pc * block_c >= lo) & (pc * block_c < hi))
        def _(dy_ref=dy_ref, lo=lo):
            own = firsts(t)
            g0 = dpre(t, dy_ref, lo, own)  # the rows' own outputs (t >= 0 only)
            # dweight and dbias from the rows' own outputs; the windows are loaded again (L1
            # hits) rather than kept live across the K recomputations below
            for i in range(k):
                dw_ref[pb, pt, i, c_sl] = jnp.sum(g0 * window(t + (i - (k - 1)), own), axis=0)
            db_ref[pb, pt, c_sl] = jnp.sum(g0, axis=0)
            dx = g0 * w[k - 1]
            for m in range(1, k):
                if f_ref is None:
                    dx = dx + dpre(t + m, dy_ref, lo) * w[k - 1 - m]
                else:  # output t + m reads row t only inside its own document
                    own_m = firsts(t + m)
                    g = dpre(t + m, dy_ref, lo, own_m)
                    dx = dx + jnp.where((t >= own_m)[:, None], g, 0.0) * w[k - 1 - m]
            # rows outside an output are masked (Triton) and sent past its end, where the
            # interpreter drops them (a clipped or negative index could land on a real row)
            rows = (t >= 0) & (t < length)
            plgpu.store(dx_ref.at[pb, jnp.where(rows, t, length)[:, None], ch[None, :]],
                        dx.astype(dx_ref.dtype), mask=rows[:, None])
            if has_state:
                srow = jnp.where(t < 0, t + (k - 1), k - 1)
                plgpu.store(ds_ref.at[pb, srow[:, None], ch[None, :]],
                            dx.astype(ds_ref.dtype), mask=(t < 0)[:, None])


@functools.partial(jax.jit, static_argnames=(
    "offset", "splits", "activation", "interpret", "block_t", "block_c", "num_warps"))
def _backward(src, weight, bias, initial_state, first, dys, *, offset, splits, activation,
              interpret, block_t, block_c, num_warps):
    """Gradients for (src, weight, bias, initial_state) from the outputs' cotangents `dys`;
    src's gradient is zero outside the columns read."""
    from jax.experimental.pallas import triton as plgpu

    b, length, width = src.shape
    k, c = weight.shape
    has_bias, has_state = bias is not None, initial_state is not None
    starts = tuple(sum(splits[:i]) for i in range(len(splits) + 1))
    # half the forward's rows: the K recomputed pre-activations need more registers
    block_t = max(16, block_t // 2)
    n_rows = pl.cdiv(length + k - 1, block_t)
    packed = first is not None
    dx, ds, dw, db = pl.pallas_call(
        with_optional_ref(functools.partial(
            _backward_kernel, k=k, length=length, offset=offset, starts=starts,
            block_t=block_t, block_c=block_c, has_bias=has_bias, has_state=has_state,
            activation=activation,
        ), 4, packed),
        grid=(b, n_rows, c // block_c),
        out_shape=[jax.ShapeDtypeStruct((b, length, c), src.dtype),
                   jax.ShapeDtypeStruct((b, k - 1, c) if has_state else (1, 1, 1), f32),
                   jax.ShapeDtypeStruct((b, n_rows, k, c), f32),
                   jax.ShapeDtypeStruct((b, n_rows, c), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="causal_conv1d_bwd",
    )(src, weight, bias if has_bias else np.zeros((1,), np.float32),
      initial_state if has_state else np.zeros((1, 1, 1), np.float32),
      *([first] if packed else []), *dys)
    dsrc = jnp.pad(dx, ((0, 0), (0, 0), (offset, width - offset - c)))
    return (dsrc, jnp.sum(dw, axis=(0, 1)).astype(weight.dtype),
            jnp.sum(db, axis=(0, 1)).astype(bias.dtype) if has_bias else None,
            ds.astype(initial_state.dtype) if has_state else None)
