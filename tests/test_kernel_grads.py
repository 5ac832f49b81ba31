"""Gradients through the Pallas kernels (their custom_vjp backward passes) against `jax.vjp` of
the fp32 references, for every differentiable input.

Each gradient is checked for NaN/inf, for its relative RMS error ‖out − ref‖ / ‖ref‖ and for its
max error max|out − ref| / max|ref|, with tolerances per input dtype (`GRAD_TOL`). bf16 cases run
the reference on the same (bf16-rounded) inputs upcast to fp32. "interpret" runs the kernels
through the Pallas interpreter on CPU with small blocks; the `gpu` cases compile them with their
default blocks at realistic shapes. The final-state cotangent is random ("present") or zero
("absent": what JAX passes when the loss ignores the state), and one case per op takes
`jax.grad` of a loss on the outputs alone.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longmamba_kernels.causal_conv import causal_conv1d
from longmamba_kernels.common import (
    apply_gate,
    delta_from_projection,
    filter_threshold,
    gate_input,
)
from longmamba_kernels.gated_rmsnorm import gated_rms_norm
from longmamba_kernels.selective_scan import selective_scan_pallas
from longmamba_kernels.selective_scan.pallas_backward import SelectiveScanBackwardConfig
from longmamba_kernels.selective_scan.pallas_mosaic import SelectiveScanMosaicConfig
from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig
from longmamba_kernels.selective_scan.reference import selective_scan_reference
from longmamba_kernels.ssd.pallas_backward import SSDBackwardConfig
from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas
from longmamba_kernels.ssd.reference import ssd_reference

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="compiled Pallas kernels need a CUDA GPU")
GPU = [pytest.mark.gpu, gpu_only]

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
# (relative RMS error, max error relative to max|ref|) per input dtype. fp32: the kernels
# compute in fp32 with IEEE fp32 matmuls, so only the summation order differs; bf16: the
# kernels' matmul operands are bf16 (fp32 accumulation), as in the forward pass.
GRAD_TOL = {F32: (1e-5, 1e-4), BF16: (1e-2, 5e-2)}

# small blocks, so short sequences span several chunks / segments / blocks
SSD_FWD = SSDPallasConfig(chunk=16, block_p=16)
SSD_BWD = SSDBackwardConfig(chunk=16, block_p=16, states_block_p=16, block_n=16)
# the backward's other layout at the model's blocks: one head per dx program, p in blocks of
# 32, one chunk per step of the states pass
SSD_BWD_ONE_HEAD = SSDBackwardConfig(block_p=32, heads_per_program=1, states_unroll=1)
SS_FWD = SelectiveScanPallasConfig(block_e=8, block_t=2, segments=3)
SS_MOSAIC_FWD = SelectiveScanMosaicConfig(block_t=16, unroll=4, stages=2)
SS_BWD = SelectiveScanBackwardConfig(block_e=8, block_t=2, segment=8)


def assert_grad_close(out, ref, dtype, what):
    """fla-style check of one gradient: finite, relative RMS error and max error."""
    if ref is None:
        assert out is None, f"{what}: expected no gradient"
        return
    out64, ref64 = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out64.shape == ref64.shape, f"{what}: shape {out64.shape} != {ref64.shape}"
    assert np.all(np.isfinite(out64)), f"{what}: NaN or inf in the gradient"
    rms_tol, max_tol = GRAD_TOL[jnp.dtype(dtype)]
    diff = out64 - ref64
    rms = np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30)
    worst = np.max(np.abs(diff)) / max(np.max(np.abs(ref64)), 1e-30)
    assert rms <= rms_tol, f"{what}: relative RMS error {rms:.3g} > {rms_tol:g}"
    assert worst <= max_tol, f"{what}: max error {worst:.3g} of max|ref| > {max_tol:g}"


def _upcast(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def check_vjps(kernel_fn, ref_fn, args, cotangents, dtype, names, what):
    """Compares the VJPs of kernel_fn(*args) and ref_fn(*upcast args) for each cotangent."""
    _, kernel_vjp = jax.vjp(kernel_fn, *args)
    _, ref_vjp = jax.vjp(ref_fn, *_upcast(args))
    for label, ct in cotangents.items():
        out, ref = kernel_vjp(ct), ref_vjp(_upcast(ct))
        for name, o, r in zip(names, out, ref, strict=True):
            if o is not None:
                assert o.dtype == jnp.result_type(args[names.index(name)]), (
                    f"{what} d{name}: dtype {o.dtype}")
            assert_grad_close(o, r, dtype, f"{what} ({label}) d{name}")


def _random_like(key, tree, dtype=None):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, a.shape).astype(dtype or a.dtype)
                              for k, a in zip(keys, leaves, strict=True)])


def _zero_state(ct):
    """The cotangents with the final state's set to zero ("absent")."""
    return (ct[0], jnp.zeros_like(ct[1]))


# --------------------------------------------------------------------------------------- SSD
@dataclasses.dataclass(frozen=True)
class SSDCase:
    l: int
    filt: bool
    init: bool
    b: int = 2
    h: int = 4
    p: int = 8  # padded to 16 inside the kernels
    g: int = 2
    n: int = 16


def ssd_args(case: SSDCase, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    b, l, h, p, g, n = case.b, case.l, case.h, case.p, case.g, case.n
    x = jax.random.normal(k[0], (b, l, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 1.0)  # about half below 0.3
    A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=-1.0, maxval=1.5))
    B = jax.random.normal(k[3], (b, l, g, n)).astype(dtype)
    C = jax.random.normal(k[4], (b, l, g, n)).astype(dtype)
    D = jax.random.normal(k[5], (h,))
    s0 = jax.random.normal(k[6], (b, h, p, n)) if case.init else None
    # even heads global, threshold near Δ's median: about half their tokens dropped
    thr = filter_threshold(jnp.arange(h) % 2 == 0, jnp.full((h,), 0.3), h) if case.filt \
        else None
    return (x, dt, A, B, C, D, s0, thr)


def _ssd_kernel(x, dt, A, B, C, D, s0, thr, *, fwd=SSD_FWD, bwd=SSD_BWD, interpret=True):
    return ssd_pallas(x, dt, A, B, C, D, initial_state=s0, threshold=thr, interpret=interpret,
                      config=fwd, backward_config=bwd)


def _ssd_ref(x, dt, A, B, C, D, s0, thr):
    return ssd_reference(x, dt, A, B, C, D, initial_state=s0, threshold=thr)


SSD_NAMES = ["x", "dt", "A", "B", "C", "D", "s0", "thr"]


@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, marks=pytest.mark.slow)],
                         ids=lambda d: d.name)
def test_ssd_grads_ragged_filter_init(dtype):
    """37 tokens in chunks of 16 (the last one padded), 2 groups of 2 heads, p = 8 padded to 16,
    filter and initial state on; the final state's cotangent present and absent. The filter's
    dropped tokens get exactly zero dΔ, the threshold no gradient."""
    args = ssd_args(SSDCase(l=37, filt=True, init=True), dtype, seed=1)
    ct = _random_like(jax.random.key(2), jax.eval_shape(_ssd_ref, *_upcast(args)))
    check_vjps(_ssd_kernel, _ssd_ref, args, {"dS present": ct, "dS absent": _zero_state(ct)},
               dtype, SSD_NAMES, "ssd")
    d_dt = jax.vjp(_ssd_kernel, *args)[1](ct)[1]
    dt, thr = args[1], args[7]
    dropped = dt <= thr
    assert int(dropped.sum()) > 10
    assert bool(jnp.all(jnp.where(dropped, d_dt, 0.0) == 0.0))


def test_ssd_grads_one_token_no_filter_no_init():
    """T = 1 (one chunk, 15 padded tokens), no filter, no initial state: `jax.grad` of a loss
    on y alone (JAX passes a zero final-state cotangent)."""
    args = ssd_args(SSDCase(l=1, filt=False, init=False), F32, seed=3)
    wy = jax.random.normal(jax.random.key(4), args[0].shape)
    loss = lambda fn: lambda *a: jnp.sum(wy * fn(*a, None, None)[0])
    out = jax.grad(loss(_ssd_kernel), argnums=tuple(range(6)))(*args[:6])
    ref = jax.grad(loss(_ssd_ref), argnums=tuple(range(6)))(*args[:6])
    for name, o, r in zip(SSD_NAMES, out, ref, strict=False):
        assert_grad_close(o, r, F32, f"ssd T=1 d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("case", [SSDCase(l=64, filt=False, init=True, g=1),
                                  SSDCase(l=20, filt=True, init=False, g=4)], ids=str)
def test_ssd_grads_more_shapes(case):
    args = ssd_args(case, F32, seed=5)
    ct = _random_like(jax.random.key(6), jax.eval_shape(_ssd_ref, *_upcast(args)))
    check_vjps(_ssd_kernel, _ssd_ref, args, {"dS present": ct}, F32, SSD_NAMES, "ssd")


@pytest.mark.slow
def test_ssd_grads_default_blocks_interpret():
    """The default backward blocks (p = 64 in blocks of 32 and 16, n = 128 in blocks of 64,
    chunks of 64) through the interpreter: 130 tokens, 3 chunks, the last ragged."""
    args = ssd_args(SSDCase(l=130, filt=True, init=True, b=1, h=2, p=64, g=1, n=128), F32,
                    seed=9)
    ct = _random_like(jax.random.key(10), jax.eval_shape(_ssd_ref, *_upcast(args)))
    kernel = functools.partial(_ssd_kernel, bwd=SSDBackwardConfig())
    check_vjps(kernel, _ssd_ref, args, {"dS present": ct}, F32, SSD_NAMES, "ssd default")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("case", [SSDCase(l=1000, filt=True, init=True, b=2, h=8, p=64, g=2,
                                          n=128),
                                  SSDCase(l=333, filt=False, init=False, b=1, h=8, p=64, g=1,
                                          n=128)], ids=["ragged_filter_init", "plain"])
@pytest.mark.parametrize("bwd", [SSDBackwardConfig(), SSD_BWD_ONE_HEAD],
                         ids=["default", "one_head"])
@pytest.mark.gpu
@gpu_only
def test_ssd_grads_gpu(case, dtype, bwd):
    """Compiled, default blocks (and one head per dx program, one chunk per states step, p in
    blocks of 32), mamba2-like heads (p = 64, n = 128)."""
    args = ssd_args(case, dtype, seed=7)
    ct = _random_like(jax.random.key(8), jax.eval_shape(_ssd_ref, *_upcast(args)))
    kernel = functools.partial(_ssd_kernel, fwd=SSDPallasConfig(),
                               bwd=bwd, interpret=False)
    check_vjps(kernel, _ssd_ref, args, {"dS present": ct, "dS absent": _zero_state(ct)},
               dtype, SSD_NAMES, "ssd gpu")


SSD_BWD_OTHER = dataclasses.replace(SSD_BWD, states_unroll=3, heads_per_program=1)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_ssd_grads_other_backward_blocks(packed):
    """Three chunks per states step (37 tokens: all three chunks of 16 in one step, where the
    default two leave one after the loop), one head per dx program, n = 40 (padded to 48 → 64),
    filter and initial state on; with `packed`, documents of `PACK_LENGTHS[:4]` + the rest:
    every gradient equals the reference's (each document alone when packed)."""
    case = SSDCase(l=37, filt=True, init=True, n=40)
    args = ssd_args(case, F32, seed=13)
    if not packed:
        kernel = functools.partial(_ssd_kernel, bwd=SSD_BWD_OTHER)
        ref = _ssd_ref
    else:
        kernel, ref = _ssd_packed((1, 3, 12, 1, 20), args[0].shape[0], SSD_BWD_OTHER)
    ct = _random_like(jax.random.key(14), jax.eval_shape(ref, *args))
    check_vjps(kernel, ref, args, {"dS present": ct, "dS absent": _zero_state(ct)}, F32,
               SSD_NAMES, "ssd other backward blocks")


# Packed documents: the gradient of a packed loss is the sum of the documents' gradients. The
# reference runs each document alone (the first from the initial state) and concatenates.
PACK_LENGTHS = (1, 3, 12, 1, 40, 2, 1, 9)  # boundaries at 1, inside chunks of 16, at 16, ...


def _pack_ids(lengths, b):
    ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return jnp.asarray(np.broadcast_to(ids, (b, ids.size)))


def _documents_alone(ref, lengths, time_args, make_args):
    """ref run on each document alone: `make_args(args, lo, hi, first)` slices the time axes
    (the arguments at positions `time_args`) and drops the initial state after the first
    document. Returns a function of the full arguments: (y concatenated, the last state)."""
    ends = np.cumsum(lengths)

    def fn(*args):
        ys, state = [], None
        for i, (lo, hi) in enumerate(zip(ends - np.asarray(lengths), ends, strict=True)):
            part = [a[:, lo:hi] if k in time_args and a is not None else a
                    for k, a in enumerate(args)]
            y, state = ref(*make_args(part, i == 0))
            ys.append(y)
        return jnp.concatenate(ys, axis=1), state

    return fn


def _ssd_packed(lengths, b, bwd):
    """The SSD kernel on documents of `lengths` packed in each of b rows (backward blocks
    `bwd`), and the reference running each document alone (the first from the initial state)."""
    ids = _pack_ids(lengths, b)
    kernel = lambda *a: ssd_pallas(*a[:6], initial_state=a[6], threshold=a[7],
                                   segment_ids=ids, interpret=True, config=SSD_FWD,
                                   backward_config=bwd)
    alone = _documents_alone(_ssd_ref, lengths, (0, 1, 3, 4),
                             lambda a, first: (*a[:6], a[6] if first else None, a[7]))
    return kernel, alone


@pytest.mark.parametrize("init", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["init", "no_init"])
def test_ssd_grads_packed_documents(init):
    """69 tokens in 8 documents (`PACK_LENGTHS`), chunks of 16, filter on: every gradient
    (x, Δ, A, B, C, D, the initial state) of a packed loss on y and the final state equals the
    sum over the documents run alone."""
    args = ssd_args(SSDCase(l=sum(PACK_LENGTHS), filt=True, init=init), F32, seed=41)
    kernel, alone = _ssd_packed(PACK_LENGTHS, args[0].shape[0], SSD_BWD)
    ct = _random_like(jax.random.key(42), jax.eval_shape(alone, *args))
    check_vjps(kernel, alone, args, {"dS present": ct}, F32, SSD_NAMES, "ssd packed")


# ---------------------------------------------------------------------------- selective scan
@dataclasses.dataclass(frozen=True)
class SSCase:
    l: int
    filt: bool
    init: bool
    fused: bool  # Δ from the raw projection (dt_bias + softplus) and the gate z
    b: int = 2
    e: int = 20  # not a multiple of the channel block
    n: int = 4


def ss_args(case: SSCase, dtype, seed=0, softplus=True):
    k = jax.random.split(jax.random.key(seed), 9)
    b, l, e, n = case.b, case.l, case.e, case.n
    x = jax.random.normal(k[0], (b, l, e)).astype(dtype)
    raw = jax.random.normal(k[1], (b, l, e)) - 1.0
    A = -jnp.exp(jax.random.uniform(k[2], (e, n), minval=-1.0, maxval=1.5))
    B = jax.random.normal(k[3], (b, l, n)).astype(dtype)
    C = jax.random.normal(k[4], (b, l, n)).astype(dtype)
    D = jax.random.normal(k[5], (e,))
    h0 = jax.random.normal(k[6], (b, e, n)) if case.init else None
    thr = filter_threshold(jnp.arange(e) % 2 == 0, jnp.full((e,), 0.3), e) if case.filt \
        else None
    if case.fused:  # the raw projection in the input dtype; the gate is z's last e columns
        dt, bias = raw.astype(dtype), 0.5 * jax.random.normal(k[7], (e,))
        z = jax.random.normal(k[8], (b, l, 2 * e + 3)).astype(dtype)
        if not softplus:  # Δ = dt + dt_bias must stay >= 0 (else the state grows)
            dt, bias = jax.nn.softplus(raw).astype(dtype), jnp.abs(bias)
    else:
        dt, bias, z = jax.nn.softplus(raw), None, None
    return (x, dt, A, B, C, D, h0, thr, bias, z)


def _ss_kernel(x, dt, A, B, C, D, h0, thr, bias, z, *, softplus, fwd=SS_FWD, bwd=SS_BWD,
               interpret=True):
    return selective_scan_pallas(x, dt, A, B, C, D, initial_state=h0, threshold=thr,
                                 dt_bias=bias, dt_softplus=softplus, z=z, interpret=interpret,
                                 config=fwd, backward_config=bwd)


def _ss_ref(x, dt, A, B, C, D, h0, thr, bias, z, *, softplus):
    """`selective_scan`'s reference path: Δ from the projection, the scan, the gate."""
    if bias is not None or softplus:
        dt = delta_from_projection(dt, bias, softplus)
    y, h = selective_scan_reference(x, dt, A, B, C, D, initial_state=h0, threshold=thr)
    if z is not None:
        y = apply_gate(y, gate_input(z, x.shape[-1]))
    return y, h


SS_NAMES = ["x", "dt", "A", "B", "C", "D", "h0", "thr", "dt_bias", "z"]


def _check_ss(case, dtype, fwd, bwd=SS_BWD, interpret=True, softplus=True, seed=11):
    args = ss_args(case, dtype, seed=seed, softplus=softplus)
    sp = softplus if case.fused else False
    kernel = functools.partial(_ss_kernel, softplus=sp, fwd=fwd, bwd=bwd, interpret=interpret)
    ref = functools.partial(_ss_ref, softplus=sp)
    ct = _random_like(jax.random.key(seed + 1), jax.eval_shape(ref, *_upcast(args)))
    check_vjps(kernel, ref, args, {"dh present": ct, "dh absent": _zero_state(ct)}, dtype,
               SS_NAMES, f"selective_scan {fwd}")
    return args, kernel, ct


@pytest.mark.parametrize("fwd", [SS_FWD, SS_MOSAIC_FWD], ids=["triton", "mosaic"])
def test_selective_scan_grads_fused_ragged_filter_init(fwd):
    """37 tokens (blocks of 2 in segments of 8, the last padded), 20 channels in blocks of 8,
    the fused Δ prologue (dt_bias + softplus) and the gate read from a wider z, filter and
    initial state on; one backward whichever kernel ran the forward. Tokens the filter dropped
    (it compares softplus(dt + dt_bias)) get exactly zero d dt; z's columns outside the gate
    get zero gradient."""
    args, kernel, ct = _check_ss(SSCase(l=37, filt=True, init=True, fused=True), F32, fwd)
    x, dt, thr, bias, z = args[0], args[1], args[7], args[8], args[9]
    grads = jax.vjp(kernel, *args)[1](ct)
    dropped = jax.nn.softplus(dt + bias) <= thr
    assert int(dropped.sum()) > 100
    assert bool(jnp.all(jnp.where(dropped, grads[1], 0.0) == 0.0))
    e = x.shape[-1]
    assert bool(jnp.all(grads[9][..., : z.shape[-1] - e] == 0.0))
    assert float(jnp.abs(grads[9][..., z.shape[-1] - e:]).max()) > 0.0


def test_selective_scan_grads_one_token_plain():
    """T = 1, Δ given (no prologue, no gate), no filter, no initial state: `jax.grad` of a loss
    on y alone."""
    args = ss_args(SSCase(l=1, filt=False, init=False, fused=False), F32, seed=13)
    wy = jax.random.normal(jax.random.key(14), args[0].shape)

    def loss(fn):
        return lambda *a: jnp.sum(wy * fn(*a, None, None, None, None, softplus=False)[0])

    out = jax.grad(loss(_ss_kernel), argnums=tuple(range(6)))(*args[:6])
    ref = jax.grad(loss(_ss_ref), argnums=tuple(range(6)))(*args[:6])
    for name, o, r in zip(SS_NAMES, out, ref, strict=False):
        assert_grad_close(o, r, F32, f"selective_scan T=1 d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("case,softplus", [
    (SSCase(l=37, filt=True, init=True, fused=True), True),
    (SSCase(l=37, filt=False, init=False, fused=True), False),  # bias alone, padded time
    (SSCase(l=16, filt=True, init=False, fused=False, e=8, n=16), True),
], ids=["fused", "bias_without_softplus", "plain_n16"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_selective_scan_grads_more_cases(case, softplus, dtype):
    _check_ss(case, dtype, SS_FWD, softplus=softplus)


@pytest.mark.slow
def test_selective_scan_grads_default_blocks_interpret():
    """The default backward blocks (32 channels, blocks of 4 tokens, segments of 256) through
    the interpreter: 300 tokens in two segments, 40 channels in two blocks, n = 16."""
    _check_ss(SSCase(l=300, filt=True, init=True, fused=True, b=1, e=40, n=16), F32, SS_FWD,
              bwd=SelectiveScanBackwardConfig())


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("fwd", [SelectiveScanPallasConfig(), SelectiveScanMosaicConfig(),
                                 SelectiveScanPallasConfig(layout="tile", block_t=4)],
                         ids=["lane", "mosaic", "tile-t4"])
@pytest.mark.gpu
@gpu_only
def test_selective_scan_grads_gpu(fwd, dtype):
    """Compiled, default backward blocks, the model's fused call (mamba-1.4b's n = 16), ragged
    length."""
    _check_ss(SSCase(l=999, filt=True, init=True, fused=True, b=2, e=256, n=16), dtype, fwd,
              bwd=SelectiveScanBackwardConfig(), interpret=False)


@pytest.mark.parametrize("fwd", [SS_FWD, pytest.param(SS_MOSAIC_FWD, marks=pytest.mark.slow)],
                         ids=["triton", "mosaic"])
def test_selective_scan_grads_packed_documents(fwd):
    """69 tokens in 8 documents (`PACK_LENGTHS`) over backward segments of 8 tokens (several
    with a document start, one without), the fused prologue and gate, filter and initial state
    on: every gradient of a packed loss on y and the final state equals the sum over the
    documents run alone."""
    args = ss_args(SSCase(l=sum(PACK_LENGTHS), filt=True, init=True, fused=True), F32, seed=43)
    ids = _pack_ids(PACK_LENGTHS, args[0].shape[0])
    kernel = lambda *a: selective_scan_pallas(
        *a[:6], initial_state=a[6], threshold=a[7], dt_bias=a[8], dt_softplus=True, z=a[9],
        segment_ids=ids, interpret=True, config=fwd, backward_config=SS_BWD)
    ref = functools.partial(_ss_ref, softplus=True)
    alone = _documents_alone(ref, PACK_LENGTHS, (0, 1, 3, 4, 9),
                             lambda a, first: (*a[:6], a[6] if first else None, *a[7:]))
    ct = _random_like(jax.random.key(44), jax.eval_shape(alone, *args))
    check_vjps(kernel, alone, args, {"dh present": ct}, F32, SS_NAMES, "selective_scan packed")


# ------------------------------------------------------------------------------- causal conv
CONV_NAMES = ["src", "weight", "bias", "initial_state"]


def conv_args(length, k, splits, with_bias, with_state, dtype, width=96, seed=0):
    c = sum(splits)
    key = jax.random.split(jax.random.key(seed), 4)
    src = jax.random.normal(key[0], (2, length, width)).astype(dtype)
    w = (0.5 * jax.random.normal(key[1], (k, c))).astype(dtype)
    bias = jax.random.normal(key[2], (c,)).astype(dtype) if with_bias else None
    state = jax.random.normal(key[3], (2, k - 1, c)) if with_state else None
    return src, w, bias, state


def _check_conv(length, k, splits, with_bias, with_state, activation, dtype, offset=16,
                width=96, interpret=True, block_t=16, seed=21, lengths=None):
    args = conv_args(length, k, splits, with_bias, with_state, dtype, width, seed)
    kw = dict(offset=offset, splits=splits, activation=activation, lengths=lengths)

    def kernel(src, w, bias, state):
        return causal_conv1d(src, w, bias, initial_state=state, out_dtype=dtype,
                             implementation="pallas", interpret=interpret, block_t=block_t,
                             **kw)

    def ref(src, w, bias, state):  # fp32 out: the kernel's rounding to its dtype passes dy on
        return causal_conv1d(src, w, bias, initial_state=state, out_dtype=jnp.float32, **kw)

    ct = _random_like(jax.random.key(seed + 1), jax.eval_shape(kernel, *args))
    ct = (ct[0], ct[1].astype(jnp.float32))
    check_vjps(kernel, ref, args, {"dstate present": ct, "dstate absent": _zero_state(ct)},
               dtype, CONV_NAMES, f"causal_conv l={length} k={k}")
    return args, kernel, ct


@pytest.mark.parametrize("length,k,splits,with_bias,with_state,activation,lengths", [
    # ragged blocks, three outputs, state; row 1's final state ends at its token 30
    (37, 4, (32, 16, 16), True, True, "silu", (37, 30)),
    (2, 4, (64,), False, True, None, None),  # fewer tokens than the state holds
    (1, 4, (48, 16), True, False, "silu", None),  # one token, no state
], ids=["T37_splits_state_silu_lengths", "T2_state_linear", "T1_nostate_silu"])
def test_causal_conv_grads(length, k, splits, with_bias, with_state, activation, lengths):
    """Channels read at offset 16 of 96 columns: src's gradient lands in those columns and is
    zero elsewhere. The final state (a slice of the inputs) is differentiated by XLA."""
    lengths = None if lengths is None else jnp.array(lengths)
    args, kernel, ct = _check_conv(length, k, splits, with_bias, with_state, activation, F32,
                                   lengths=lengths)
    dsrc = jax.vjp(kernel, *args)[1](ct)[0]
    c = sum(splits)
    assert bool(jnp.all(dsrc[..., :16] == 0.0)) and bool(jnp.all(dsrc[..., 16 + c:] == 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("length,k,splits", [(37, 4, (32, 16, 16)), (100, 2, (48, 16))])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_causal_conv_grads_more_cases(length, k, splits, dtype):
    _check_conv(length, k, splits, True, True, "silu", dtype)


@pytest.mark.slow
def test_causal_conv_grads_default_blocks_interpret():
    """The default blocks (64 tokens, so 32 in the backward; 128 channels) through the
    interpreter: 70 tokens, 256 channels at offset 20 of 300."""
    _check_conv(70, 4, (256,), True, True, "silu", F32, offset=20, width=300, block_t=64)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("offset,splits,width,with_state", [
    (1024, (1024, 128, 128), 2368, True),  # Mamba2's xBC in place in [z | xBC | dt]
    (0, (1024,), 2048, False),  # Mamba-1's x, the first half of [x | z]
], ids=["mamba2", "mamba1"])
@pytest.mark.gpu
@gpu_only
def test_causal_conv_grads_gpu(offset, splits, width, with_state, dtype):
    _check_conv(1000, 4, splits, True, with_state, "silu", dtype, offset=offset, width=width,
                interpret=False, block_t=64)


# ---------------------------------------------------------------------------- gated RMSNorm
def _check_norm(dtype, rows=(2, 37), e=128, z_width=300, interpret=True):
    k = jax.random.split(jax.random.key(31), 3)
    y = (2.0 * jax.random.normal(k[0], (*rows, e))).astype(dtype)
    z = jax.random.normal(k[1], (*rows, z_width)).astype(dtype)
    w = (1.0 + 0.2 * jax.random.normal(k[2], (e,))).astype(dtype)
    kernel = lambda y, z, w: gated_rms_norm(y, z, w, implementation="pallas",
                                            interpret=interpret)
    ref = lambda y, z, w: gated_rms_norm(y, z, w)
    ct = _random_like(jax.random.key(32), jax.eval_shape(kernel, y, z, w))
    check_vjps(kernel, ref, (y, z, w), {"dout": ct}, dtype, ["y", "z", "weight"],
               "gated_rms_norm")
    return (y, z, w), kernel, ct


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_gated_rms_norm_grads(dtype):
    """74 rows (blocks of 32 rows, the last ragged), z wider than y (the gate is its first 128
    of 300 columns): z's other columns get zero gradient."""
    args, kernel, ct = _check_norm(dtype)
    dz = jax.vjp(kernel, *args)[1](ct)[1]
    assert bool(jnp.all(dz[..., 128:] == 0.0)) and float(jnp.abs(dz[..., :128]).max()) > 0


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
@pytest.mark.gpu
@gpu_only
def test_gated_rms_norm_grads_gpu(dtype):
    _check_norm(dtype, rows=(2, 1000), e=2048, z_width=4480, interpret=False)

# ----------------------------------------------------------- lowering for CUDA (runs on CPU)
def _cuda_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernel_names(text):
    return set(re.findall(r'name = "([a-z0-9_]+)"', text))


S = jax.ShapeDtypeStruct


def _ssd_model_args(dtype):
    b, l, h, p, g, n = 1, 1000, 8, 64, 1, 128  # mamba2-1.3b heads, ragged length
    return (S((b, l, h, p), dtype), S((b, l, h), jnp.float32), S((h,), jnp.float32),
            S((b, l, g, n), dtype), S((b, l, g, n), dtype), S((h,), jnp.float32),
            S((b, h, p, n), jnp.float32), S((h,), jnp.float32))


def _ss_model_args(dtype):
    b, l, e, n = 1, 1000, 256, 16  # mamba-1.4b's state size, the model's fused call
    return (S((b, l, e), dtype), S((b, l, e), dtype), S((e, n), jnp.float32),
            S((b, l, n), dtype), S((b, l, n), dtype), S((e,), jnp.float32),
            S((b, e, n), jnp.float32), S((e,), jnp.float32), S((e,), jnp.float32),
            S((b, l, 2 * e), dtype))


def _grad_of_sum(fn, n_args):
    def loss(*a):
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*a)))
    return jax.grad(loss, argnums=tuple(range(n_args)))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
def test_ssd_backward_lowers_for_cuda(dtype):
    """The gradient program lowers for CUDA with the three backward kernels, default blocks."""
    kernel = functools.partial(_ssd_kernel, fwd=SSDPallasConfig(), bwd=SSDBackwardConfig(),
                               interpret=False)
    text = _cuda_text(_grad_of_sum(kernel, 7), *_ssd_model_args(dtype))
    assert {"ssd_bwd_states", "ssd_bwd_dx", "ssd_bwd_dbc"} <= _kernel_names(text)
    assert "__nv_expf" not in text  # decays as exp2, as in the forward


def test_ssd_backward_one_head_per_program_lowers_for_cuda():
    """One head per dx program, one chunk per states step, p in blocks of 32: lowers for
    CUDA."""
    kernel = functools.partial(_ssd_kernel, fwd=SSDPallasConfig(), bwd=SSD_BWD_ONE_HEAD,
                               interpret=False)
    text = _cuda_text(_grad_of_sum(kernel, 7), *_ssd_model_args(BF16))
    assert {"ssd_bwd_states", "ssd_bwd_dx"} <= _kernel_names(text)


@pytest.mark.parametrize("fwd", [SelectiveScanPallasConfig(), SelectiveScanMosaicConfig()],
                         ids=["triton", "mosaic"])
def test_selective_scan_backward_lowers_for_cuda(fwd):
    """The gradient program lowers for CUDA with the three backward kernels after either
    forward kernel, fused prologue and gate, default blocks; fast-math exponentials."""
    kernel = functools.partial(_ss_kernel, softplus=True, fwd=fwd,
                               bwd=SelectiveScanBackwardConfig(), interpret=False)
    text = _cuda_text(_grad_of_sum(kernel, 10), *_ss_model_args(BF16))
    names = _kernel_names(text)
    assert {"selective_scan_bwd_local", "selective_scan_bwd_fold", "selective_scan_bwd"} <= names
    assert "ex2.approx.ftz.f32" in text


def test_forward_without_gradient_runs_no_backward_kernel():
    """Without differentiation the programs hold only the forward kernels (the custom_vjp adds
    nothing to the forward)."""
    ssd = functools.partial(_ssd_kernel, fwd=SSDPallasConfig(), interpret=False)
    ss = functools.partial(_ss_kernel, softplus=True, fwd=SelectiveScanPallasConfig(),
                           interpret=False)
    for fn, args in ((ssd, _ssd_model_args(BF16)), (ss, _ss_model_args(BF16))):
        names = _kernel_names(_cuda_text(fn, *args))
        assert names and not any("bwd" in name for name in names), names



def test_conv_and_norm_backward_lower_for_cuda():
    """Both backward kernels lower for CUDA at the models' shapes (mamba2-1.3b: xBC in place in
    in_proj's output with a conv state, the norm's gate its first 4096 of 8512 columns)."""
    def conv(src, w, bias, state):
        return causal_conv1d(src, w, bias, initial_state=state, offset=4096,
                             splits=(4096, 128, 128), activation="silu",
                             out_dtype=jnp.bfloat16, implementation="pallas")

    text = _cuda_text(_grad_of_sum(conv, 4), S((1, 1000, 8512), BF16), S((4, 4352), BF16),
                      S((4352,), BF16), S((1, 3, 4352), jnp.float32))
    assert "causal_conv1d_bwd" in _kernel_names(text)

    def norm(y, z, w):
        return gated_rms_norm(y, z, w, implementation="pallas")

    text = _cuda_text(_grad_of_sum(norm, 3), S((1, 1000, 4096), BF16),
                      S((1, 1000, 8512), BF16), S((4096,), BF16))
    assert "gated_rms_norm_bwd" in _kernel_names(text)
