"""Mamba2's gated RMSNorm, out = weight · norm(y · silu(z)), in one pass over the rows.

    out = gated_rms_norm(y, z, weight, eps=1e-5, implementation="pallas")

Implementations: "reference" (jnp; what XLA compiles), "pallas" (a Pallas kernel, one program
per row; `interpret=True` runs it through the Pallas interpreter on any platform).

Why a kernel: XLA splits the jnp form into two fusions, because y · silu(z) feeds both the
mean of squares and the normalisation. The first writes that product in fp32 and the second
reads it back: at mamba2-1.3b's shapes and 16K tokens, 0.36 ms a layer, against about 0.18 ms
for reading y and z once and writing the output (docs/kernels.md, "Gated RMSNorm"). The kernel keeps
the row in registers between the two uses.

The math is the reference's, step by step: g = y · z · sigmoid(z) in fp32,
n = g · rsqrt(mean(g²) + eps) in fp32, then cast to the weight's dtype and multiplied by the
weight in that dtype (as `longmamba_jax.layers.rms_norm` does). Only the order of the sum
differs. One norm group per row (group size = the row width; Mamba2 with ngroups = 1): the
kernel needs the row width to be a power of two (a Triton block); `supported` says whether a
shape qualifies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longmamba_kernels.common import apply_gate

f32 = jnp.float32


def supported(width: int, group_size: int) -> bool:
    """Whether the Pallas kernel handles rows of `width` normed in groups of `group_size`."""
    return group_size == width and width >= 16 and width & (width - 1) == 0 and width <= 16384


def gated_rms_norm(y, z, weight, *, eps: float = 1e-5, group_size: int | None = None,
                   implementation: str = "reference", interpret: bool = False):
    """Mamba2's gated RMSNorm (mamba_ssm RMSNormGated, norm_before_gate=False).

    Args:
      y: [..., E] (fp32 or bf16), the scan's output.
      z: [..., E'] with E' >= E: the gate is its first E columns, so the in_proj output
        (z first) can be passed whole, without a copy of the slice.
      weight: [E]; the output has its dtype.
      eps: added to the mean of squares.
      group_size: channels per norm group (None: E).
      implementation: "reference" | "pallas".
      interpret: run the Pallas kernel through the interpreter; only for "pallas".

    Returns:
      [..., E] in weight's dtype.
    """
    *lead, e = y.shape
    group_size = e if group_size is None else group_size
    if tuple(z.shape[:-1]) != tuple(lead) or z.shape[-1] < e or weight.shape != (e,):
        raise ValueError(
            f"gated_rms_norm shapes disagree: y {y.shape}, z {z.shape} (needs [..., >= {e}]), "
            f"weight {weight.shape} (needs ({e},))"
        )
    if e % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide width {e}")
    if implementation == "reference":
        return _reference(y, z[..., :e], weight, eps, group_size)
    if implementation != "pallas":
        raise ValueError(
            f"gated_rms_norm: unknown implementation {implementation!r} "
            "(expected 'reference' or 'pallas')"
        )
    if not supported(e, group_size):
        raise ValueError(
            f"gated_rms_norm(implementation='pallas') needs one group per row of a power-of-two "
            f"width in [16, 16384]; got width {e}, group_size {group_size}: use 'reference'"
        )
    rows = 1
    for d in lead:
        rows *= d
    out = _differentiable(y.reshape(rows, e), z.reshape(rows, z.shape[-1]), weight, float(eps),
                          bool(interpret))
    return out.reshape(*lead, e)


def _reference(y, z, weight, eps, group_size):
    """The jnp form: `longmamba_jax.layers.rms_norm(y · silu(z), weight, eps, group_size)`."""
    g = apply_gate(y.astype(f32), z)
    *lead, e = g.shape
    gg = g.reshape(*lead, e // group_size, group_size)
    gg = gg * jax.lax.rsqrt(jnp.mean(gg * gg, axis=-1, keepdims=True) + eps)
    return weight * gg.reshape(*lead, e).astype(weight.dtype)


def _kernel(y_ref, z_ref, w_ref, o_ref, *, eps, width):
    i = pl.program_id(0)
    y = y_ref[i, :].astype(f32)
    z = z_ref[i, pl.ds(0, width)].astype(f32)
    g = y * (z * (1.0 / (1.0 + jnp.exp(-z))))
    ms = jnp.sum(g * g) * (1.0 / width)
    n = (g * jax.lax.rsqrt(ms + eps)).astype(w_ref.dtype)
    o_ref[i, :] = (w_ref[...] * n).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _pallas(y, z, weight, *, eps, interpret):
    rows, width = y.shape
    from jax.experimental.pallas import triton as plgpu

    num_warps = 4 if width <= 4096 else 8
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, width=width),
        grid=(rows,),
        out_shape=jax.ShapeDtypeStruct((rows, width), weight.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_rms_norm",
    )(y, z, weight)


# ------------------------------------------------------------------------------ gradients
# The forward kernel runs unchanged; its inputs are the residuals and the backward kernel
# recomputes each row's norm (docs/kernels.md, "Backward passes").
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _differentiable(y, z, weight, eps, interpret):
    return _pallas(y, z, weight, eps=eps, interpret=interpret)


def _differentiable_fwd(y, z, weight, eps, interpret):
    return _pallas(y, z, weight, eps=eps, interpret=interpret), (y, z, weight)


def _differentiable_bwd(eps, interpret, residuals, dout):
    y, z, weight = residuals
    return _backward(y, z, weight, dout, eps=eps, interpret=interpret)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)

# rows per program of the backward: each program adds its rows' parts of dweight in registers
BACKWARD_ROWS = 32


def _backward_kernel(y_ref, z_ref, w_ref, do_ref, dy_ref, dz_ref, dw_ref, *, eps, width, rows,
                     block_rows):
    """Rows i … i + block_rows: with g = y·silu(z), r = rsqrt(mean(g²) + eps), n = g·r and
    dn = dout·w: dg = r·(dn − n·mean(dn·n)), dy = dg·silu(z), dz = dg·y·silu'(z), and the rows'
    part of dweight = Σ dout·n (n rounded to the weight's dtype, as the forward multiplies)."""
    pid = pl.program_id(0)
    w = w_ref[...].astype(f32)

    def row(k, dw):
        i = pid * block_rows + k
        valid = i < rows
        i = jnp.minimum(i, rows - 1)  # a ragged last block recomputes (and rewrites) the last row
        y = y_ref[i, :].astype(f32)
        z = z_ref[i, pl.ds(0, width)].astype(f32)
        dout = do_ref[i, :].astype(f32)
        sig = 1.0 / (1.0 + jnp.exp(-z))
        silu = z * sig
        g = y * silu
        r = jax.lax.rsqrt(jnp.sum(g * g) * (1.0 / width) + eps)
        n = g * r
        dn = dout * w
        dg = r * (dn - n * (jnp.sum(dn * n) * (1.0 / width)))
        dy_ref[i, :] = (dg * silu).astype(dy_ref.dtype)
        dz_ref[i, :] = (dg * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
        nw = n.astype(w_ref.dtype).astype(f32)
        return dw + jnp.where(valid, dout * nw, 0.0)

    dw_ref[pid, :] = jax.lax.fori_loop(0, block_rows, row, jnp.zeros((width,), f32))


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _backward(y, z, weight, dout, *, eps, interpret):
    """(dy, dz, dweight); dz has z's full width, zero past the gate's columns."""
    from jax.experimental.pallas import triton as plgpu

    rows, width = y.shape
    block_rows = min(BACKWARD_ROWS, rows)
    n_prog = pl.cdiv(rows, block_rows)
    # about ten row vectors live at once: 8 warps keep a 4,096-wide row in registers
    num_warps = 4 if width <= 1024 else 8 if width <= 4096 else 16
    dy, dz, dw = pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps, width=width, rows=rows,
                          block_rows=block_rows),
        grid=(n_prog,),
        out_shape=[jax.ShapeDtypeStruct((rows, width), y.dtype),
                   jax.ShapeDtypeStruct((rows, width), z.dtype),
                   jax.ShapeDtypeStruct((n_prog, width), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_rms_norm_bwd",
    )(y, z, weight, dout)
    dz = jnp.pad(dz, ((0, 0), (0, z.shape[-1] - width)))
    return dy, dz, jnp.sum(dw, axis=0).astype(weight.dtype)
