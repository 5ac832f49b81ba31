"""Mamba-1 selective scan as a Pallas GPU kernel (Triton lowering), LongMamba filter fused in.

Per channel e and state n:

    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] x_t[e] B_t[n]
    y_t[e]    = Σ_n h_t[e, n] C_t[n] + D[e] x_t[e]
    Δ_t[e] := 0 where Δ_t[e] <= threshold[e]        (the folded LongMamba filter)

Design: one program per (batch, block of e channels) walks time sequentially and carries its
state slice [e_blk, n] in registers (fp32). Each loop step handles `block_t` tokens, unrolled, so
the loads of a step are issued together, and the loads of step s+1 are issued before step s is
computed (registers double-buffer them). Every input is read once and y written once. The
recurrence has no matmul form (the decay depends on both e and n), so there are no tensor-core
dots here; the kernel is bound by the instructions each warp issues per token (about 42 for
4 channels × 16 states on the H100, evals/NOTES_kernels.md "Session 6"). Decays are exp2 with A
pre-scaled by log2 e (`common.LOG2E`), compiled as one `ex2.approx.ftz` each, and the state
update as one `fma`: one exponential per state element and token.
Any length is accepted: time is zero-padded to a multiple of `block_t` (Δ = 0 keeps the state),
e to a multiple of the channel block and n to a power of two, only when needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longmamba_kernels.common import LOG2E, pad_time


@dataclasses.dataclass(frozen=True)
class SelectiveScanPallasConfig:
    """Block sizes of the selective-scan kernel.

    Attributes:
      block_e: channels per program (power of two; capped at e rounded up to a power of two).
      block_t: tokens per loop step (unrolled).
      num_warps: warps per program.
      num_stages: Triton software-pipelining depth of the time loop.
      prefetch: load the next step's tokens before computing this step's (the loads of one
        step overlap the work of the previous one; twice the registers for loaded values).
      fast_math: compiled kernels only: decays as one `ex2.approx.ftz.f32` and the state
        update as `fma.rn.f32`, through inline PTX (XLA's Triton pipeline neither flushes
        subnormals nor contracts a*b+c). Interpret mode computes the same with jnp.
    """

    block_e: int = 4
    block_t: int = 32
    num_warps: int = 1
    num_stages: int = 2
    prefetch: bool = True
    fast_math: bool = True

    def __post_init__(self):
        if self.block_e < 1 or self.block_e & (self.block_e - 1):
            raise ValueError(f"block_e must be a power of two, got {self.block_e}")
        if self.block_t < 1:
            raise ValueError(f"block_t must be >= 1, got {self.block_t}")


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


def _selective_scan_kernel(
    x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, thr_ref, h0_ref,  # inputs
    y_ref, h_ref,  # outputs
    *, block_e, block_t, n_steps, has_d, has_init, prefetch, fast,
):
    f32 = jnp.float32
    bi, ei = pl.program_id(0), pl.program_id(1)
    e_sl = pl.ds(ei * block_e, block_e)
    n = a_ref.shape[-1]
    a = a_ref[e_sl, :].astype(f32)  # [e_blk, n], A log2(e): base-2 decays
    d = d_ref[e_sl] if has_d else None  # [e_blk]
    thr = thr_ref[e_sl]  # [e_blk]; -inf where unfiltered
    h = h0_ref[bi, e_sl, :].astype(f32) if has_init else jnp.zeros((block_e, n), f32)
    if fast:
        exp2 = lambda v: _ptx("ex2.approx.ftz.f32 $0, $1;", v)
        fma = lambda u, v, w: _ptx("fma.rn.f32 $0, $1, $2, $3;", u, v, w)
    else:
        exp2, fma = jnp.exp2, lambda u, v, w: u * v + w

    def load(step):
        # All loads of a step are issued together: stores to y could alias them as far as the
        # compiler knows, so loads placed after a store would each wait for their full latency.
        toks = []
        for k in range(block_t):  # unrolled
            t = step * block_t + k
            toks.append((x_ref[bi, t, e_sl], dt_ref[bi, t, e_sl], b_ref[bi, t, :],
                         c_ref[bi, t, :]))  # [e_blk], [e_blk], [n], [n]; cast at use
        return toks

    def compute(step, toks, h):
        for k, (x, dt, bt, ct) in enumerate(toks):
            x, dt, bt, ct = (v.astype(f32) for v in (x, dt, bt, ct))
            dt = jnp.where(dt <= thr, 0.0, dt)  # LongMamba filter
            h = fma(exp2(dt[:, None] * a), h, (dt * x)[:, None] * bt[None, :])  # [e_blk, n]
            y = jnp.sum(h * ct[None, :], axis=1)  # [e_blk]
            if has_d:
                y = fma(d, x, y)
            y_ref[bi, step * block_t + k, e_sl] = y
        return h

    if prefetch:  # registers double-buffer the tokens: step s+1 loads while step s computes
        def body(step, carry):
            h, toks = carry
            nxt = load(jnp.minimum(step + 1, n_steps - 1))  # the last step reloads itself
            return compute(step, toks, h), nxt

        h, _ = jax.lax.fori_loop(0, n_steps, body, (h, load(0)))
    else:
        h = jax.lax.fori_loop(0, n_steps, lambda step, h: compute(step, load(step), h), h)
    h_ref[bi, e_sl, :] = h


def selective_scan_pallas(
    x, dt, A, B, C, D=None, *, initial_state=None, threshold=None, interpret=False, config=None
):
    """Mamba-1 selective scan, Pallas kernel. Same contract as `selective_scan_reference`.

    Args:
      x: [b, l, e] fp32 or bf16. dt: [b, l, e] Δ after softplus (fp32). A: [e, n] fp32.
      B, C: [b, l, n]. D: [e] or None. initial_state: [b, e, n] or None.
      threshold: [e] fp32 folded filter or None.
      interpret: run through the Pallas interpreter (any platform).
      config: `SelectiveScanPallasConfig`; None for the defaults.

    Returns:
      (y [b, l, e] fp32, final_state [b, e, n] fp32).
    """
    config = SelectiveScanPallasConfig() if config is None else config
    return _selective_scan_pallas(
        x, dt, A, B, C, D, initial_state, threshold, interpret=interpret, config=config
    )


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def _selective_scan_pallas(x, dt, A, B, C, D, initial_state, threshold, *, interpret, config):
    f32 = jnp.float32
    b, length, e = x.shape
    n = A.shape[-1]
    if dt.shape != x.shape or A.shape != (e, n) or B.shape != (b, length, n):
        raise ValueError(
            f"selective_scan_pallas shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, "
            f"B {B.shape}"
        )
    block_e = min(config.block_e, _next_pow2(e))
    block_t = config.block_t
    ep = -(-e // block_e) * block_e
    np_ = _next_pow2(n)
    pad_e = lambda a, axis: a if ep == e else jnp.pad(
        a, [(0, ep - e if i == axis else 0) for i in range(a.ndim)]
    )
    pad_n = lambda a: a if np_ == n else jnp.pad(
        a, [(0, np_ - n if i == a.ndim - 1 else 0) for i in range(a.ndim)]
    )
    xs = pad_e(pad_time(x, block_t), 2)  # [b, l', e']
    dts = pad_e(pad_time(dt.astype(f32), block_t), 2)  # Δ = 0 on padding
    Bs, Cs = (pad_n(pad_time(a, block_t)) for a in (B, C))  # [b, l', n']
    As = pad_n(pad_e(A.astype(f32) * LOG2E, 0))  # [e', n'], base-2 decays in the kernel
    has_d, has_init = D is not None, initial_state is not None
    d = pad_e((D if has_d else jnp.zeros((e,))).astype(f32), 0)
    # The compare always runs (no filter: -inf, never true), so both cases share one kernel.
    thr = jnp.full((e,), -jnp.inf, f32) if threshold is None else threshold.astype(f32)
    thr = pad_e(thr, 0)
    h0 = (
        pad_n(pad_e(initial_state.astype(f32), 1)) if has_init else jnp.zeros((1, 1, 1), f32)
    )
    padded_len = xs.shape[1]
    kernel = functools.partial(
        _selective_scan_kernel,
        block_e=block_e, block_t=block_t, n_steps=padded_len // block_t,
        has_d=has_d, has_init=has_init, prefetch=config.prefetch,
        fast=config.fast_math and not interpret,
    )
    from jax.experimental.pallas import triton as plgpu

    y, h = pl.pallas_call(
        kernel,
        grid=(b, ep // block_e),
        out_shape=[
            jax.ShapeDtypeStruct((b, padded_len, ep), f32),
            jax.ShapeDtypeStruct((b, ep, np_), f32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="selective_scan",
    )(xs, dts, As, Bs, Cs, d, thr, h0)
    return y[:, :length, :e], h[:, :e, :n]
