"""Mamba-1 selective scan as a Pallas GPU kernel (Triton lowering), LongMamba filter fused in.

Per channel e and state n:

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] x_t[e] B_t[n]
    y_t[e]    = Σ_n h_t[e, n] C_t[n] + D[e] x_t[e]
    Δ_t[e] := 0 where Δ_t[e] <= threshold[e]        (the folded LongMamba filter)

Optionally fused around it, as mamba_ssm's CUDA kernel does: Δ from the raw projection
(Δ = softplus(dt + dt_bias), so Δ is never written to memory in fp32) and the gate
(y := y · silu(z), written in bf16 for the out projection).

Two layouts (`SelectiveScanPallasConfig.layout`); the recurrence has no matmul form (the decay
depends on both e and n), so neither uses tensor cores, and both compute each decay as one exp2
of A pre-scaled by log2 e (`common.LOG2E`), compiled as one `ex2.approx.ftz`, and each state
update as one `fma`.

On Hopper GPUs (n <= 64) the default is neither: `default_config` picks the Mosaic GPU kernel
of `pallas_mosaic.py` (one pass over time), 1.3–1.4× faster on the H100.

- "lane" (the default elsewhere): each thread owns whole channels (4 at n = 16), their n states in
  registers, so y's sum over n stays in the thread; B_t and C_t are loaded as scalars, the
  same for the whole warp. That leaves too few programs at batch 1 (4,096 channels are 32
  one-warp programs), so time is split into segments (`lane_segments`): a states pass walks
  each segment from a zero state, keeping its final state and its sum of Δ; the scan pass then
  starts segment s from the state the earlier segments leave,
  h <- exp2(A Σ_segment Δ) h + h_segment (combined in its prologue), and walks it again writing
  y. Two exponentials per state element and token, but 1.7× fewer instructions per channel
  and token than "tile" over both passes; on the H100 the ex2 unit is their busiest pipe
  (docs/kernels.md, "Selective scan (Triton)"). A thread holds 2 × n × channels fp32 values (states
  and decay rates), so by default it owns fewer channels as n grows (`lane_channels`): 4 at
  Mamba-1's n = 16, 2 at n = 32, 1 from n = 64, 8 at n <= 8.
- "tile": one program per (batch, block of e channels) walks all of time once, its state slice
  [e_blk, n] spread over a warp, so the sum over n crosses threads (about 42 instructions per
  warp and token for 4 channels × 16 states).

In both, each loop step handles `block_t` tokens, unrolled, and the loads of step s+1 are issued
before step s is computed (registers double-buffer them). Every input is read once per pass and
y written once.
Any length is accepted: time is zero-padded to a multiple of `block_t` (times the segments;
Δ = 0 keeps the state), e to a multiple of the channel block and ("tile" only) n to a power of
two, only when needed.

Packed documents (`segment_ids`; docs/kernels.md, "Packed documents"): the kernels read a
per-token log-offset r_t (−∞ at a document's first token, else 0; `common.reset_offsets`), one
warp-uniform scalar a token, and take each decay as exp2(fma(Δ, a, r_t)), the same instruction
count as exp2(Δ a); the "lane" combine takes exp2(fma(A, Σ Δ, r_segment)) with r_segment −∞
for a time segment in which a document starts. Without segment_ids nothing of this is compiled.
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
    check_selective_scan_shapes,
    delta_from_projection,
    document_index,
    gate_input,
    pad_axis,
    pad_time,
    reset_offsets,
    span_offsets,
    with_optional_ref,
)


@dataclasses.dataclass(frozen=True)
class SelectiveScanPallasConfig:
    """Layout and block sizes of the selective-scan kernel.

    Attributes:
      layout: "lane" (a thread owns whole channels: their n states are registers, time split
        into segments for parallelism) or "tile" (the state as an [e_blk, n] tile spread over a
        warp; the y sum over n crosses threads).
      block_e: channels per program (power of two; capped at e rounded up to a power of two).
        None: `lane_channels(n)` per thread (128 per warp at n = 16) for "lane", 4 for
        "tile". `resolve(n)` fills it in.
      block_t: tokens per loop step (unrolled). None: 2 for "lane" (1 for n > 32), 32 for
        "tile".
      num_warps: warps per program.
      num_stages: Triton software-pipelining depth of the time loop.
      segments: "lane" only: time segments walked in parallel (a first pass computes each
        segment's state from zero, a second combines them and walks each segment again with
        its true initial state). 0 picks it from the grid size (`lane_segments`).
      prefetch: load the next step's tokens before computing this step's (the loads of one
        step overlap the work of the previous one; twice the registers for loaded values).
      fast_math: compiled kernels only: decays as one `ex2.approx.ftz.f32` and the state
        update as `fma.rn.f32`, through inline PTX (XLA's Triton pipeline neither flushes
        subnormals nor contracts a*b+c). Interpret mode computes the same with jnp.
    """

    layout: str = "lane"
    block_e: int | None = None
    block_t: int | None = None
    num_warps: int = 1
    num_stages: int = 2
    segments: int = 0
    prefetch: bool = True
    fast_math: bool = True

    def __post_init__(self):
        if self.layout not in ("lane", "tile"):
            raise ValueError(f"layout must be 'lane' or 'tile', got {self.layout!r}")
        lane = self.layout == "lane"
        if not lane:  # the lane defaults depend on n: `resolve`
            if self.block_e is None:
                object.__setattr__(self, "block_e", 4)
            if self.block_t is None:
                object.__setattr__(self, "block_t", 32)
        if self.block_e is not None and (self.block_e < 1 or self.block_e & (self.block_e - 1)):
            raise ValueError(f"block_e must be a power of two, got {self.block_e}")
        if self.block_t is not None and self.block_t < 1:
            raise ValueError(f"block_t must be >= 1, got {self.block_t}")
        if self.segments < 0 or (self.segments > 1 and not lane):
            raise ValueError(f"segments must be >= 0 and needs layout='lane', got "
                             f"{self.segments} with layout={self.layout!r}")

    def resolve(self, n: int) -> SelectiveScanPallasConfig:
        """This config with the blocks it leaves unset filled in for state size n."""
        if self.block_e is not None and self.block_t is not None:
            return self
        return dataclasses.replace(
            self,
            block_e=self.block_e or 32 * self.num_warps * lane_channels(n),
            block_t=self.block_t or (2 if n <= 32 else 1),
        )


def lane_channels(n: int) -> int:
    """The "lane" layout's default channels per thread for state size n: a power of two near
    64 / n, from 1 to 8, so the states and decay rates a thread holds stay near 128 fp32
    registers. Measured on the H100 at 16K tokens (docs/kernels.md, "Selective scan
    (Triton)"): n = 8 runs fastest with 8, n = 16 with 4, n = 32 with 2, n = 64 with 1; at
    n = 128 one channel spills but still beats the "tile" layout."""
    return min(8, 1 << max(64 // max(n, 1), 1).bit_length() - 1)


# The "lane" layout's automatic time split: segments double while the grid stays under this many
# programs and each segment keeps at least this many tokens.
LANE_TARGET_PROGRAMS = 1024
LANE_MIN_SEGMENT = 64


def lane_segments(batch: int, channel_blocks: int, length: int) -> int:
    """Time segments of the "lane" layout: a power of two, so that batch × channel blocks ×
    segments programs fill the GPU (up to `LANE_TARGET_PROGRAMS`) and segments keep at least
    `LANE_MIN_SEGMENT` tokens."""
    segments = 1
    while (2 * segments * batch * channel_blocks <= LANE_TARGET_PROGRAMS
           and length >= 2 * segments * LANE_MIN_SEGMENT):
        segments *= 2
    return segments


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _ptx(asm, *args):
    """One PTX instruction per fp32 element (compiled Triton only)."""
    from jax.experimental.pallas import triton as plgpu

    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    [out] = plgpu.elementwise_inline_asm(
        asm, args=[jnp.broadcast_to(a, shape) for a in args],
        constraints="=r," + ",".join("r" * len(args)), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return out


def _math(fast):
    """(exp2, fma): inline PTX `ex2.approx.ftz` and `fma.rn` when `fast`, else jnp."""
    if fast:
        return (lambda v: _ptx("ex2.approx.ftz.f32 $0, $1;", v),
                lambda u, v, w: _ptx("fma.rn.f32 $0, $1, $2, $3;", u, v, w))
    return jnp.exp2, lambda u, v, w: u * v + w


def _delta(dt, bias, softplus, thr, exp2):
    """Δ of one token from what the kernel loaded: (dt + bias), softplus'ed as max(v, 0) +
    log1p(exp(-|v|)) (jax.nn.softplus's form, the exponential in base 2), then the LongMamba
    filter."""
    dt = dt.astype(jnp.float32)
    if bias is not None:
        dt = dt + bias
    if softplus:
        dt = jnp.maximum(dt, 0.0) + jnp.log1p(exp2(jnp.abs(dt) * -LOG2E))
    return jnp.where(dt <= thr, 0.0, dt)  # LongMamba filter


def _gate(y, z, exp2):
    """y · silu(z) = y z / (1 + exp(-z))."""
    if z is None:
        return y
    z = z.astype(jnp.float32)
    return y * z / (1.0 + exp2(z * -LOG2E))


def _time_loop(n_steps, load, compute, carry, prefetch):
    """Runs `carry = compute(step, load(step), carry)` for each step. With `prefetch` the loop
    carries the next step's loads, issued before this step is computed (registers double-buffer
    the tokens); the last step reloads itself."""
    if prefetch:
        def body(step, c):
            state, toks = c
            nxt = load(jnp.minimum(step + 1, n_steps - 1))
            return compute(step, toks, state), nxt

        return jax.lax.fori_loop(0, n_steps, body, (carry, load(0)))[0]
    return jax.lax.fori_loop(0, n_steps, lambda step, c: compute(step, load(step), c), carry)


def _selective_scan_kernel(
    x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, thr_ref, bias_ref, h0_ref, z_ref, r_ref,  # inputs
    y_ref, h_ref,  # outputs
    *, block_e, block_t, n_steps, has_d, has_init, prefetch, fast, has_bias, softplus, has_z,
    z_off,
):
    f32 = jnp.float32
    bi, ei = pl.program_id(0), pl.program_id(1)
    e_sl = pl.ds(ei * block_e, block_e)
    z_sl = pl.ds(z_off + ei * block_e, block_e)
    n = a_ref.shape[-1]
    a = a_ref[e_sl, :].astype(f32)  # [e_blk, n], A log2(e): base-2 decays
    d = d_ref[e_sl] if has_d else None  # [e_blk]
    thr = thr_ref[e_sl]  # [e_blk]; -inf where unfiltered
    bias = bias_ref[e_sl] if has_bias else None
    h = h0_ref[bi, e_sl, :].astype(f32) if has_init else jnp.zeros((block_e, n), f32)
    exp2, fma = _math(fast)

    def load(step):
        # All loads of a step are issued together: stores to y could alias them as far as the
        # compiler knows, so loads placed after a store would each wait for their full latency.
        toks = []
        for k in range(block_t):  # unrolled
            t = step * block_t + k
            toks.append((x_ref[bi, t, e_sl], dt_ref[bi, t, e_sl], b_ref[bi, t, :],
                         c_ref[bi, t, :], z_ref[bi, t, z_sl] if has_z else None,
                         r_ref[bi, t] if r_ref is not None else None))
            # [e_blk], [e_blk], [n], [n], [e_blk], scalar; cast at use
        return toks

    def compute(step, toks, h):
        for k, (x, dt, bt, ct, z, r) in enumerate(toks):
            x, bt, ct = (v.astype(f32) for v in (x, bt, ct))
            dt = _delta(dt, bias, softplus, thr, exp2)
            log_decay = dt[:, None] * a if r is None else fma(dt[:, None], a, r)  # [e_blk, n]
            h = fma(exp2(log_decay), h, (dt * x)[:, None] * bt[None, :])  # [e_blk, n]
            y = jnp.sum(h * ct[None, :], axis=1)  # [e_blk]
            if has_d:
                y = fma(d, x, y)
            y_ref[bi, step * block_t + k, e_sl] = _gate(y, z, exp2).astype(y_ref.dtype)
        return h

    h_ref[bi, e_sl, :] = _time_loop(n_steps, load, compute, h, prefetch)


# ------------------------------------------------ the "lane" layout: a thread owns whole channels
def _lane_walk(x_ref, dt_ref, b_ref, c_ref, y_ref, *, bi, e_sl, t0, n_steps, block_t, a, thr, d,
               h, sdt, prefetch, fast, bias=None, softplus=False, z_ref=None, z_sl=None,
               r_ref=None):
    """Walks `n_steps * block_t` tokens from `t0` for the channels `e_sl`.

    The state is n separate [e_blk] vectors, so every state element of a channel lives in the
    thread that owns the channel (each thread owns e_blk / 32 / num_warps whole channels) and
    the y sum needs no cross-thread reduction. B_t and C_t are loaded as scalars (uniform across
    the warp) and broadcast for free. With `c_ref` None only the state (and `sdt`, the running
    sum of Δ) is computed. `bias` / `softplus`: Δ from the raw projection (`_delta`); `z_ref`
    (columns `z_sl`): the gate, y := y · silu(z); `r_ref` [b, l]: the per-token log-offsets of
    packed documents (decays exp2(Δ a + r_t)). Returns (h, sdt).
    """
    f32 = jnp.float32
    n = len(h)
    exp2, fma = _math(fast)
    with_y = c_ref is not None

    def load(step):
        toks = []
        for k in range(block_t):  # unrolled
            t = t0 + step * block_t + k
            toks.append((x_ref[bi, t, e_sl], dt_ref[bi, t, e_sl],
                         [b_ref[bi, t, j] for j in range(n)],
                         [c_ref[bi, t, j] for j in range(n)] if with_y else [],
                         z_ref[bi, t, z_sl] if with_y and z_ref is not None else None,
                         r_ref[bi, t] if r_ref is not None else None))
        return toks

    def compute(step, toks, carry):
        h, sdt = carry
        for k, (x, dt, bt, ct, z, r) in enumerate(toks):
            x = x.astype(f32)
            dt = _delta(dt, bias, softplus, thr, exp2)
            u = dt * x
            if sdt is not None:
                sdt = sdt + dt
            # the log-decay Δ a, or Δ a + r_t with packed documents (one fma either way)
            h = [fma(exp2(dt * a[j] if r is None else fma(dt, a[j], r)), h[j],
                     u * bt[j].astype(f32)) for j in range(n)]
            if with_y:
                y = h[0] * ct[0].astype(f32)
                for j in range(1, n):
                    y = fma(h[j], ct[j].astype(f32), y)
                if d is not None:
                    y = fma(d, x, y)
                y_ref[bi, t0 + step * block_t + k, e_sl] = _gate(y, z, exp2).astype(y_ref.dtype)
        return h, sdt

    return _time_loop(n_steps, load, compute, (h, sdt), prefetch)


def _lane_states_kernel(x_ref, dt_ref, a_ref, b_ref, thr_ref, bias_ref, r_ref, hs_ref, sdt_ref,
                        *, block_e, block_t, seg_steps, prefetch, fast, has_bias, softplus):
    """Pass 1 of the time-split scan: segment s's state from zero, and its sum of Δ."""
    bi, ei, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e_sl = pl.ds(ei * block_e, block_e)
    n = a_ref.shape[0]
    a = [a_ref[j, e_sl] for j in range(n)]  # A log2(e) per state: [e_blk] each
    zero = jnp.zeros((block_e,), jnp.float32)
    h, sdt = _lane_walk(
        x_ref, dt_ref, b_ref, None, None, bi=bi, e_sl=e_sl, t0=si * seg_steps * block_t,
        n_steps=seg_steps, block_t=block_t, a=a, thr=thr_ref[e_sl], d=None, h=[zero] * n,
        sdt=zero, prefetch=prefetch, fast=fast, bias=bias_ref[e_sl] if has_bias else None,
        softplus=softplus, r_ref=r_ref)
    for j in range(n):
        hs_ref[bi, si, j, e_sl] = h[j]
    sdt_ref[bi, si, e_sl] = sdt


def _lane_scan_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, thr_ref, bias_ref, h0_ref,
                      hs_ref, sdt_ref, z_ref, r_ref, rs_ref, y_ref, h_ref, *, block_e, block_t,
                      seg_steps, n_seg, has_d, has_init, prefetch, fast, has_bias, softplus,
                      has_z, z_off):
    """Pass 2: segment s's outputs, from the state the earlier segments leave (combined here
    from pass 1's per-segment states: h <- exp2(A Σ Δ) h + h_s; with packed documents
    exp2(A Σ Δ + r_s), r_s = −∞ (`rs_ref` [b, k]) for a segment where a document starts)."""
    f32 = jnp.float32
    bi, ei, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e_sl = pl.ds(ei * block_e, block_e)
    n = a_ref.shape[0]
    exp2, fma = _math(fast)
    a = [a_ref[j, e_sl] for j in range(n)]
    h = ([h0_ref[bi, j, e_sl] for j in range(n)] if has_init
         else [jnp.zeros((block_e,), f32)] * n)
    if n_seg > 1:
        def combine(s, h):
            sd = sdt_ref[bi, s, e_sl]
            rs = None if rs_ref is None else rs_ref[bi, s]
            return [fma(exp2(a[j] * sd if rs is None else fma(a[j], sd, rs)), h[j],
                        hs_ref[bi, s, j, e_sl]) for j in range(n)]

        h = jax.lax.fori_loop(0, si, combine, h)
    h, _ = _lane_walk(
        x_ref, dt_ref, b_ref, c_ref, y_ref, bi=bi, e_sl=e_sl, t0=si * seg_steps * block_t,
        n_steps=seg_steps, block_t=block_t, a=a, thr=thr_ref[e_sl],
        d=d_ref[e_sl] if has_d else None, h=h, sdt=None, prefetch=prefetch, fast=fast,
        bias=bias_ref[e_sl] if has_bias else None, softplus=softplus,
        z_ref=z_ref if has_z else None, z_sl=pl.ds(z_off + ei * block_e, block_e), r_ref=r_ref)

    @pl.when(si == n_seg - 1)
    def _():
        for j in range(n):
            h_ref[bi, j, e_sl] = h[j]


def selective_scan_triton(
    x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, dt_bias=None,
    dt_softplus=False, z=None, out_dtype=jnp.float32, segment_ids=None, interpret=False,
    config: SelectiveScanPallasConfig | None = None,
):
    """Mamba-1 selective scan, Pallas Triton kernel. Same contract as
    `longmamba_kernels.selective_scan.selective_scan_pallas`, which chooses between this kernel
    and the Mosaic GPU one; `config` None is the "lane" layout's defaults."""
    config = SelectiveScanPallasConfig() if config is None else config
    doc = None if segment_ids is None else document_index(segment_ids)
    return _selective_scan_pallas(
        x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, doc, softplus=bool(dt_softplus),
        out_dtype=jnp.dtype(out_dtype), interpret=interpret, config=config
    )


@functools.partial(jax.jit, static_argnames=("softplus", "out_dtype", "interpret", "config"))
def _selective_scan_pallas(x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, doc, *,
                           softplus, out_dtype, interpret, config):
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    check_selective_scan_shapes("selective_scan_pallas", x, dt, A, B, C)
    config = config.resolve(n)
    block_e = min(config.block_e, _next_pow2(e))
    ep = -(-e // block_e) * block_e
    pad_e = lambda a, axis: pad_axis(a, axis, ep)
    has_d = D is not None
    d = pad_e((D if has_d else jnp.zeros((e,))).astype(f32), 0)
    # The compare always runs (no filter: -inf, never true), so both cases share one kernel.
    thr = jnp.full((e,), -jnp.inf, f32) if threshold is None else threshold.astype(f32)
    thr = pad_e(thr, 0)
    n_seg = (1 if config.layout == "tile" else
             config.segments or lane_segments(b, ep // block_e, length))
    multiple = config.block_t * n_seg  # time is padded to this
    padded = length % multiple != 0
    if dt_bias is not None and not softplus and padded:
        # padded tokens need Δ = 0; with softplus a raw -inf gives that, with a bias alone not
        dt, dt_bias = delta_from_projection(dt, dt_bias), None
    has_bias = dt_bias is not None
    bias = pad_e(dt_bias.astype(f32), 0) if has_bias else jnp.zeros((1,), f32)
    # raw projections are read as they are (bf16: half the bytes); plain Δ is read as fp32
    if not (has_bias or softplus):
        dt = dt.astype(f32)
    dt_pad = -jnp.inf if softplus else 0.0  # softplus(-inf) = 0: padded tokens keep the state
    has_z = z is not None
    if has_z and (padded or ep != e):
        z = pad_e(pad_time(gate_input(z, e), multiple), 2)
    z_off = z.shape[-1] - ep if has_z else 0
    if not has_z:
        z = jnp.zeros((1, 1, 1), x.dtype)
    common = dict(block_e=block_e, block_t=config.block_t, prefetch=config.prefetch,
                  fast=config.fast_math and not interpret, has_bias=has_bias, softplus=softplus)
    fused = dict(bias=bias, z=z, has_z=has_z, z_off=z_off, dt_pad=dt_pad, out_dtype=out_dtype,
                 doc=doc)
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    if config.layout == "lane":
        y, h = _lane_call(x, dt, A, B, C, d, thr, initial_state, has_d=has_d, ep=ep,
                          pad_e=pad_e, n_seg=n_seg, call=call, **fused, **common)
    else:
        y, h = _tile_call(x, dt, A, B, C, d, thr, initial_state, has_d=has_d, ep=ep,
                          pad_e=pad_e, call=call, **fused, **common)
    return y[:, :length, :e], h[:, :e, :n]


def _lane_call(x, dt, A, B, C, d, thr, initial_state, *, has_d, ep, pad_e, n_seg, call,
               block_e, block_t, prefetch, fast, has_bias, softplus, bias, z, has_z, z_off,
               dt_pad, out_dtype, doc):
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    xs = pad_e(pad_time(x, block_t * n_seg), 2)  # [b, l', e']
    dts = pad_e(pad_time(dt, block_t * n_seg, value=dt_pad), 2)  # Δ = 0 on padding
    # B and C in fp32 (they are small: n per token): loaded as scalars, bf16 ones would be
    # carried over the loop packed two per register, and packing them waits for the load.
    Bs, Cs = (pad_time(a.astype(f32), block_t * n_seg) for a in (B, C))  # [b, l', n]
    At = pad_e(A.astype(f32) * LOG2E, 0).T  # [n, e']: base-2 decays, rows contiguous in e
    has_init = initial_state is not None
    h0 = (pad_e(initial_state.astype(f32), 1).transpose(0, 2, 1) if has_init
          else jnp.zeros((1, 1, 1), f32))  # [b, n, e']
    padded_len = xs.shape[1]
    seg_steps = padded_len // (block_t * n_seg)
    kw = dict(block_e=block_e, block_t=block_t, seg_steps=seg_steps, prefetch=prefetch,
              fast=fast, has_bias=has_bias, softplus=softplus)
    packed = doc is not None
    r, rs = [], []
    if packed:  # the per-token log-offsets, and each time segment's (−∞ where one starts)
        r = [reset_offsets(doc, padded_len)]  # [b, l']
        seg_len = seg_steps * block_t
        starts = np.arange(n_seg) * seg_len
        rs = [span_offsets(doc, starts, starts + seg_len)] if n_seg > 1 else [
            jnp.zeros((1, 1), f32)]  # [b, k]
    if n_seg > 1:
        hs, sdt = call(
            with_optional_ref(functools.partial(_lane_states_kernel, **kw), 6, packed),
            grid=(b, ep // block_e, n_seg - 1),
            out_shape=[jax.ShapeDtypeStruct((b, n_seg - 1, n, ep), f32),
                       jax.ShapeDtypeStruct((b, n_seg - 1, ep), f32)],
            name="selective_scan_states",
        )(xs, dts, At, Bs, thr, bias, *r)
    else:
        hs, sdt = jnp.zeros((1, 1, 1, 1), f32), jnp.zeros((1, 1, 1), f32)
    kernel = functools.partial(_lane_scan_kernel, n_seg=n_seg, has_d=has_d, has_init=has_init,
                               has_z=has_z, z_off=z_off, **kw)
    y, h = call(
        with_optional_ref(with_optional_ref(kernel, 13, packed), 12, packed),
        grid=(b, ep // block_e, n_seg),
        out_shape=[jax.ShapeDtypeStruct((b, padded_len, ep), out_dtype),
                   jax.ShapeDtypeStruct((b, n, ep), f32)],
        name="selective_scan",
    )(xs, dts, At, Bs, Cs, d, thr, bias, h0, hs, sdt, z, *r, *rs)
    return y, h.transpose(0, 2, 1)


def _tile_call(x, dt, A, B, C, d, thr, initial_state, *, has_d, ep, pad_e, call, block_e,
               block_t, prefetch, fast, has_bias, softplus, bias, z, has_z, z_off, dt_pad,
               out_dtype, doc):
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    np_ = _next_pow2(n)
    pad_n = lambda a: pad_axis(a, a.ndim - 1, np_)
    xs = pad_e(pad_time(x, block_t), 2)  # [b, l', e']
    dts = pad_e(pad_time(dt, block_t, value=dt_pad), 2)  # Δ = 0 on padding
    Bs, Cs = (pad_n(pad_time(a, block_t)) for a in (B, C))  # [b, l', n']
    As = pad_n(pad_e(A.astype(f32) * LOG2E, 0))  # [e', n'], base-2 decays in the kernel
    has_init = initial_state is not None
    h0 = (
        pad_n(pad_e(initial_state.astype(f32), 1)) if has_init else jnp.zeros((1, 1, 1), f32)
    )
    padded_len = xs.shape[1]
    kernel = functools.partial(
        _selective_scan_kernel, block_e=block_e, block_t=block_t,
        n_steps=padded_len // block_t, has_d=has_d, has_init=has_init, prefetch=prefetch,
        fast=fast, has_bias=has_bias, softplus=softplus, has_z=has_z, z_off=z_off,
    )
    packed = doc is not None
    r = [reset_offsets(doc, padded_len)] if packed else []  # [b, l']
    return call(
        with_optional_ref(kernel, 10, packed),
        grid=(b, ep // block_e),
        out_shape=[
            jax.ShapeDtypeStruct((b, padded_len, ep), out_dtype),
            jax.ShapeDtypeStruct((b, ep, np_), f32),
        ],
        name="selective_scan",
    )(xs, dts, As, Bs, Cs, d, thr, bias, h0, z, *r)
