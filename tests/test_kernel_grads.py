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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longmamba_kernels.common import filter_threshold
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


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("case", [SSDCase(l=1000, filt=True, init=True, b=2, h=8, p=64, g=2,
                                          n=128),
                                  SSDCase(l=333, filt=False, init=False, b=1, h=8, p=64, g=1,
                                          n=128)], ids=["ragged_filter_init", "plain"])
@pytest.mark.gpu
@gpu_only
def test_ssd_grads_gpu(case, dtype):
    """Compiled, default blocks, mamba2-like heads (p = 64, n = 128)."""
    args = ssd_args(case, dtype, seed=7)
    ct = _random_like(jax.random.key(8), jax.eval_shape(_ssd_ref, *_upcast(args)))
    kernel = functools.partial(_ssd_kernel, fwd=SSDPallasConfig(), bwd=SSDBackwardConfig(),
                               interpret=False)
    check_vjps(kernel, _ssd_ref, args, {"dS present": ct, "dS absent": _zero_state(ct)},
               dtype, SSD_NAMES, "ssd gpu")
