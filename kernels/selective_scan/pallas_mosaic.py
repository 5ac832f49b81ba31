"""Mamba-1 selective scan as a Pallas Mosaic GPU kernel (Hopper): one pass over time.

Per channel e and state n (as in `selective_scan_pallas`):

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] x_t[e] B_t[n]
    y_t[e]    = Σ_n h_t[e, n] C_t[n] + D[e] x_t[e]          (then · silu(z_t[e]) with a gate)
    Δ_t[e] := 0 where Δ_t[e] <= threshold[e]                  (the folded LongMamba filter)

The Triton kernels cannot choose which thread holds what; Mosaic GPU can (`_state_layout`). A
warpgroup (128 threads) owns `block_e` channels × all n states: each thread `per_thread` (4)
consecutive states of one channel, n / 4 lanes per channel, so y's sum over n is 4 products in
the thread and two shuffles. At batch 1 that is one pass over time with enough threads
(4,096 channels × 16 states / 4 = 16,384), so every decay is evaluated once; the Triton "lane"
layout walks time twice and evaluates each decay twice (docs/kernels.md, "Selective scan
(Mosaic GPU)").

Time is walked in blocks of `block_t` tokens, copied by TMA into shared memory
`stages` blocks ahead (x, Δ, B, C, and z with a gate); y is written to shared memory and stored
by TMA. Inside a block the tokens go in groups of `unroll`: a group's shared-memory loads are
issued before its first token is computed, so their latency is paid once per group.

Fused options (mamba_ssm's `delta_bias`, `delta_softplus`, `z`): Δ from the raw projection and
the gate are computed once per block over the [block_t, block_e] tile, spread over all threads
(not once per state lane), through fp32 shared-memory buffers.

Packed documents (`segment_ids`): one more TMA input, the per-token log-offset r_t (−∞ at a
document's first token, else 0; `common.reset_offsets`) repeated over the n states ([b, l, n],
as small as B), and each decay is exp2(Δ a + r_t). Without segment_ids it is not compiled in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from longmamba_kernels.common import (
    LOG2E,
    check_selective_scan_shapes,
    document_index,
    gate_input,
    pad_axis,
    pad_time,
    reset_offsets,
)

_WARPS = 4  # per warpgroup
# Above 64 states a warpgroup would hold fewer than 8 channels at 4 states a thread (TMA rows
# of x under 16 bytes), and 8 fp32 states a thread do not load as one vector.
MAX_STATE = 64
_LANES = 32
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class SelectiveScanMosaicConfig:
    """Blocks of the Mosaic GPU selective scan.

    Attributes:
      per_thread: consecutive states of one channel per thread (a power of two dividing the
        padded n); the warpgroup holds 128 * per_thread / n channels.
      block_t: tokens per TMA block (a multiple of `unroll`).
      unroll: tokens per group (their loads are issued together, the loop body is unrolled).
      stages: TMA blocks in flight (shared-memory buffers per input).
    """

    per_thread: int = 4
    block_t: int = 64
    unroll: int = 16
    stages: int = 3

    def __post_init__(self):
        if self.per_thread < 1 or self.per_thread & (self.per_thread - 1):
            raise ValueError(f"per_thread must be a power of two, got {self.per_thread}")
        if self.unroll < 1 or self.block_t % self.unroll:
            raise ValueError(f"block_t ({self.block_t}) must be a multiple of unroll "
                             f"({self.unroll})")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


def _state_layout(block_e: int, n: int, per_thread: int):
    """[block_e, n]: `per_thread` consecutive states of one channel per thread, n / per_thread
    lanes per channel, the other lanes and the 4 warps over channels."""
    lanes_n = n // per_thread
    lanes_e = _LANES // lanes_n
    # tiled shape [.., block_e / lanes_e, 1, lanes_e, lanes_n, per_thread]: warps, lanes, vector;
    # Mosaic GPU wants the canonical form of it (trivial tiles dropped)
    layout = mgpu.TiledLayout(
        plgpu.Tiling(((block_e, n), (lanes_e, n), (1, per_thread))),
        warp_dims=(-6,), lane_dims=(-4, -3), vector_dim=-1, _check_canonical=False,
    ).canonicalize()
    return plgpu.Layout.TILED(layout.tiling, warp_dims=layout.warp_dims,
                              lane_dims=layout.lane_dims, vector_dim=layout.vector_dim)


def mosaic_blocks(n: int, per_thread: int) -> tuple[int, int, int]:
    """(padded n, states per thread, channels per warpgroup): n padded to a power of two >= 4;
    fewer states per thread where the warpgroup would hold more than 64 channels (its tiles
    would not fit in shared memory), more where n needs more than 32 lanes a channel or the
    warpgroup would hold fewer than 8 channels (a TMA box row needs 16 bytes)."""
    n_pad = max(4, 1 << max(n - 1, 0).bit_length())
    if n_pad > MAX_STATE:
        raise ValueError(f"the Mosaic GPU selective scan takes state sizes up to {MAX_STATE}; "
                         f"got n={n} (use SelectiveScanPallasConfig, the Triton kernels)")
    per_thread = min(per_thread, n_pad // 2)  # at most 64 channels (shared memory)
    per_thread = max(per_thread, n_pad // _LANES, 8 * n_pad // (_WARPS * _LANES))
    return n_pad, per_thread, _WARPS * _LANES * per_thread // n_pad


def selective_scan_mosaic(
    x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, dt_bias=None,
    dt_softplus=False, z=None, out_dtype=jnp.float32, segment_ids=None, interpret=False,
    config=None
):
    """Mamba-1 selective scan, Mosaic GPU kernel. Same contract as `selective_scan_pallas`.

    `interpret=True` runs it through Pallas's Mosaic GPU interpreter on any platform (the
    layouts, which only steer the compiled code, are left out there).
    """
    config = SelectiveScanMosaicConfig() if config is None else config
    doc = None if segment_ids is None else document_index(segment_ids)
    return _selective_scan_mosaic(
        x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, doc, softplus=bool(dt_softplus),
        out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret), config=config)


@functools.partial(jax.jit, static_argnames=("softplus", "out_dtype", "interpret", "config"))
def _selective_scan_mosaic(x, dt, A, B, C, D, initial_state, threshold, dt_bias, z, doc, *,
                           softplus, out_dtype, interpret, config):
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    check_selective_scan_shapes("selective_scan_mosaic", x, dt, A, B, C)
    n_pad, per_thread, block_e = mosaic_blocks(n, config.per_thread)
    block_t = config.block_t
    ep = -(-e // block_e) * block_e
    pad_e = lambda a, axis: pad_axis(a, axis, ep)
    pad_n = lambda a: pad_axis(a, a.ndim - 1, n_pad)
    padded = length % block_t != 0
    if dt_bias is not None and not softplus and padded:
        # padded tokens need Δ = 0; with softplus a raw -inf gives that, with a bias alone not
        dt, dt_bias = dt.astype(f32) + dt_bias.astype(f32), None
    prologue = softplus or dt_bias is not None
    if not prologue and dt.dtype != x.dtype:
        dt = dt.astype(f32)
    dt_pad = -jnp.inf if softplus else 0.0
    xs = pad_e(pad_time(x, block_t), 2)
    dts = pad_e(pad_time(dt, block_t, value=dt_pad), 2)
    Bs, Cs = (pad_n(pad_time(a.astype(f32), block_t)) for a in (B, C))
    A2 = pad_n(pad_e(A.astype(f32) * LOG2E, 0))
    chan = jnp.stack([  # 4 rows: a TMA copy of a multiple of 128 bytes
        jnp.zeros((e,), f32) if D is None else D.astype(f32),
        jnp.full((e,), -jnp.inf, f32) if threshold is None else threshold.astype(f32),
        jnp.zeros((e,), f32) if dt_bias is None else dt_bias.astype(f32),
        jnp.zeros((e,), f32),
    ])
    chan = pad_e(chan, 1)
    has_init = initial_state is not None
    h0 = pad_n(pad_e(initial_state.astype(f32), 1)) if has_init else jnp.zeros((1, 8, 8), f32)
    has_z = z is not None
    if has_z:
        # read in place unless padding is needed or the gate's columns are not 16-byte aligned
        if padded or ep != e or (z.shape[-1] - e) % 8 or z.shape[-1] % 8:
            z = pad_e(pad_time(gate_input(z, e), block_t), 2)
        z_off = z.shape[-1] - ep
    else:
        z, z_off = jnp.zeros((1, 8, 8), x.dtype), 0
    r = None
    if doc is not None:  # [b, l', n']: the offset of each token, once per state
        r = jnp.broadcast_to(reset_offsets(doc, xs.shape[1])[..., None], Bs.shape)
    y, h = _call(xs, dts, A2, Bs, Cs, chan, h0, z, r, block_e=block_e, n=n_pad,
                 per_thread=per_thread, block_t=block_t, unroll=config.unroll,
                 stages=config.stages, has_init=has_init, has_d=D is not None,
                 has_z=has_z, z_off=z_off, softplus=softplus, has_bias=dt_bias is not None,
                 out_dtype=out_dtype, interpret=interpret)
    return y[:, :length, :e], h[:, :e, :n]


def _call(x, dt, A2, B, C, chan, h0, z, r, *, block_e, n, per_thread, block_t, unroll, stages,
          has_init, has_d, has_z, z_off, softplus, has_bias, out_dtype, interpret):
    f32 = jnp.float32
    b, length, e = x.shape
    n_blocks = length // block_t
    stages = min(stages, n_blocks)
    layout = _state_layout(block_e, n, per_thread)
    chan_layout, state_layout = layout.reduce(1), layout.reduce(0)
    # the [block_t, block_e] tiles of the prologue and the gate: 4 consecutive values a thread
    tile_layout = plgpu.Layout.WG_STRIDED((block_t, block_e), vec_size=4)
    prologue = softplus or has_bias
    # Layouts only steer the compiled kernel; the Mosaic GPU interpreter has no rule for
    # layout_cast and computes the same values without them.
    cast = (lambda v, _: v) if interpret else plgpu.layout_cast
    groups = block_t // unroll
    packed = r is not None

    def body(x_ref, dt_ref, a_ref, b_ref, c_ref, chan_ref, h0_ref, z_ref, r_ref, y_ref, hT_ref,
             bufs, in_bars, misc_bar):
        xs, dts, bs, cs, zs, rs, ys, delta_s, ypre_s, a_s, chan_s, h_s, bias_s = bufs
        ib = lax.axis_index("b")
        e0 = lax.axis_index("e") * block_e
        e_sl = pl.ds(e0, block_e)

        def sources(i):
            t_sl = pl.ds(i * block_t, block_t)
            srcs = [x_ref.at[ib, t_sl, e_sl], dt_ref.at[ib, t_sl, e_sl],
                    b_ref.at[ib, t_sl], c_ref.at[ib, t_sl]]
            if has_z:
                srcs.append(z_ref.at[ib, t_sl, pl.ds(z_off + e0, block_e)])
            if packed:
                srcs.append(r_ref.at[ib, t_sl])
            return srcs

        def fetch(i, slot):
            bufs_in = (xs, dts, bs, cs) + ((zs,) if has_z else ()) + ((rs,) if packed else ())
            for src, buf, bar in zip(sources(i), bufs_in, in_bars, strict=True):
                plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

        for i in range(stages):
            fetch(i, i)
        plgpu.copy_gmem_to_smem(a_ref.at[e_sl], a_s, misc_bar.at[0])
        plgpu.copy_gmem_to_smem(chan_ref.at[:, e_sl], chan_s, misc_bar.at[1])
        if has_init:
            plgpu.copy_gmem_to_smem(h0_ref.at[ib, e_sl], h_s, misc_bar.at[2])
        plgpu.barrier_wait(misc_bar.at[0])
        plgpu.barrier_wait(misc_bar.at[1])
        a_blk = cast(a_s[...], layout)
        d_e = cast(chan_s[0], chan_layout)
        thr_e = cast(chan_s[1], chan_layout)
        if has_bias:  # the bias as a whole tile, for the prologue's strided layout
            bias_e = cast(chan_s[2], chan_layout)
            for t in range(block_t):
                bias_s[t] = bias_e
        if has_init:
            plgpu.barrier_wait(misc_bar.at[2])
            h = cast(h_s[...], layout)
        else:
            h = cast(jnp.zeros((block_e, n), f32), layout)

        def block(i, h):
            slot = lax.rem(i, stages)
            for bar in in_bars:
                plgpu.barrier_wait(bar.at[slot])
            if prologue:  # Δ of the whole tile, over all threads, into delta_s
                v = cast(dts[slot], tile_layout).astype(f32)
                if has_bias:
                    v = v + cast(bias_s[...], tile_layout)
                if softplus:  # max(v, 0) + log1p(exp(-|v|)), in base 2
                    v = jnp.maximum(v, 0.0) + jnp.log2(1.0 + jnp.exp2(jnp.abs(v) * -LOG2E)) * LN2
                delta_s[...] = v
            # ys[slot] (or ypre_s) is free once the store issued `stages` blocks ago has read it
            plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
            plgpu.commit_smem()
            delta_src = delta_s if prologue else dts.at[slot]
            y_dst = ypre_s if has_z else ys.at[slot]
            x_blk, b_blk, c_blk = xs.at[slot], bs.at[slot], cs.at[slot]
            r_blk = rs.at[slot] if packed else None

            def load(t):
                vals = (cast(x_blk[t], chan_layout), cast(delta_src[t], chan_layout),
                        cast(b_blk[t], state_layout), cast(c_blk[t], state_layout))
                return vals + ((cast(r_blk[t], state_layout),) if packed else ())

            def token(vals, h):
                xt, dtt, bt, ct = (v.astype(f32) for v in vals[:4])
                dtt = jnp.where(dtt <= thr_e, 0.0, dtt)  # LongMamba filter
                bcast = lambda v, dim: cast(lax.broadcast_in_dim(v, (block_e, n), (dim,)),
                                            layout)
                log_decay = a_blk * bcast(dtt, 0)
                if packed:  # −∞ at a document's first token: the state restarts
                    log_decay = log_decay + bcast(vals[4], 1)
                h = jnp.exp2(log_decay) * h + bcast(dtt * xt, 0) * bcast(bt, 1)
                yt = jnp.sum(h * bcast(ct, 1), axis=1)
                if has_d:
                    yt = yt + d_e * xt
                return h, yt

            def group(g, h):
                vals = [load(g * unroll + u) for u in range(unroll)]
                ys_g = []
                for u in range(unroll):
                    h, yt = token(vals[u], h)
                    ys_g.append(yt)
                for u in range(unroll):
                    y_dst[g * unroll + u] = ys_g[u].astype(y_dst.dtype)
                return h

            h = lax.fori_loop(0, groups, group, h)
            if has_z:  # the gate over the whole tile: y · z / (1 + exp(-z))
                plgpu.commit_smem()
                zt = cast(zs[slot], tile_layout).astype(f32)
                gated = cast(ypre_s[...], tile_layout) * zt / (1.0 + jnp.exp2(zt * -LOG2E))
                ys[slot] = gated.astype(ys.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ys.at[slot],
                                    y_ref.at[ib, pl.ds(i * block_t, block_t), e_sl])

            @pl.when(i + stages < n_blocks)
            def _():
                fetch(i + stages, slot)

            return h

        h = lax.fori_loop(0, n_blocks, block, h)
        h_s[...] = h
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_s, hT_ref.at[ib, e_sl])
        plgpu.wait_smem_to_gmem(0)

    def scoped(*refs):
        # without packed documents neither the offsets' input nor their buffers exist
        n_in = 8 + packed
        ins, outs = refs[:n_in], refs[n_in:]
        if not packed:
            ins = (*ins, None)
        zdt = z.dtype

        def inner(*scratch):
            *bufs, in_bars, misc_bar = scratch
            if not packed:
                bufs.insert(5, None)
            body(*ins, *outs, bufs, in_bars, misc_bar)

        smem = plgpu.SMEM
        r_buf = [smem((stages, block_t, n), f32)] if packed else []
        pl.run_scoped(
            inner,
            smem((stages, block_t, block_e), x.dtype),
            smem((stages, block_t, block_e), dt.dtype),
            smem((stages, block_t, n), f32),
            smem((stages, block_t, n), f32),
            smem((stages, block_t, block_e) if has_z else (1, 8, 8), zdt),
            *r_buf,
            smem((stages, block_t, block_e), out_dtype),
            smem((block_t, block_e) if prologue else (8, 8), f32),
            smem((block_t, block_e) if has_z else (8, 8), f32),
            smem((block_e, n), f32),
            smem((4, block_e), f32),
            smem((block_e, n), f32),
            smem((block_t, block_e) if has_bias else (8, 8), f32),
            tuple(plgpu.Barrier(num_arrivals=1, num_barriers=stages)
                  for _ in range(4 + has_z + packed)),
            plgpu.Barrier(num_arrivals=1, num_barriers=3),
        )

    kernel = plgpu.kernel(
        scoped,
        out_type=(jax.ShapeDtypeStruct((b, length, e), out_dtype),
                  jax.ShapeDtypeStruct((b, e, n), f32)),
        grid=(b, e // block_e),
        grid_names=("b", "e"),
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
        interpret=_interpret_params() if interpret else False,
    )
    return kernel(x, dt, A2, B, C, chan, h0, z, *([] if r is None else [r]))


def _interpret_params():
    # The Mosaic GPU interpreter is selected by its params object (jax has no public name for it
    # yet); `interpret=True` would pick the generic interpreter, which has no rule for TMA.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
