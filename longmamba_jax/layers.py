"""Small building blocks shared by both mixers: linear, RMSNorm, causal depthwise conv1d.

Precision policy (docs/design.md, "Precision policy"): parameters may be fp32 or bf16; matmuls
run in the parameter dtype with fp32 accumulation (`matmul_dtype`); norms, the conv, Δ, A and
the scan run in fp32; the residual stream is fp32. Parameter names mirror the torch keys
(`weight`, `bias`, `kernel` = transposed weight) so that conversion is a table.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from longmamba_jax.sharding.kernels import causal_conv1d
from longmamba_kernels.causal_conv import default_block_c as conv_block_c

f32 = jnp.float32


def silu(x):
    return x * jax.nn.sigmoid(x)


def matmul_dtype(param_dtype) -> jnp.dtype:
    """What a bf16 (or fp16) matmul writes: fp32 accumulation either way, then one rounding to
    the parameter dtype. On a GPU the rounding happens in the matmul's epilogue (bf16 out), which
    saves writing and re-reading an fp32 result: 14–18% off the models' in_proj at 16K tokens on
    an H100 (docs/kernels.md, "Matmul outputs"). XLA's CPU backend is faster with an fp32
    result, so it keeps one. fp32 parameters: fp32."""
    if jnp.dtype(param_dtype) != f32 and jax.default_backend() == "gpu":
        return jnp.dtype(param_dtype)
    return f32


def int8_matmul(x, kernel, scale, dtype, equation: str = "...i,io->...o"):
    """einsum(equation, x, kernel) · scale for a weight-only int8 kernel: fp32 [..., o].

    The kernel is converted to the compute `dtype` inside the product (XLA fuses the convert
    into the matmul, so only the int8 bytes are read), accumulated in fp32 and multiplied by
    its per-output-channel `scale` (fp32 [o]) (docs/generation.md, "Weight-only int8")."""
    y = jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype), preferred_element_type=f32)
    return y * scale


def linear(x, kernel, bias=None, scale=None, *, dtype=None):
    """x [..., i] @ kernel [i, o] (+ bias), rounded once to `dtype` (default: the kernel's).

    A float kernel runs in its own dtype with fp32 accumulation (`matmul_dtype`); an int8
    kernel (from `longmamba_jax.quantize`, with its per-output-channel `scale`) in `dtype`."""
    if scale is None:
        dtype = kernel.dtype if dtype is None else dtype
        # with a bias, y + bias is rounded once, as in torch's addmm
        out = f32 if bias is not None else matmul_dtype(kernel.dtype)
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel, preferred_element_type=out)
    else:
        y = int8_matmul(x, kernel, scale, dtype)
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] is torch's weight transposed. Quantized weights
    (`longmamba_jax.quantize`) hold an int8 kernel and its per-output-channel "scale" [out]."""

    features: int
    use_bias: bool = False
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
            self.param_dtype,
        )
        scale = (self.get_variable("params", "scale") if self.has_variable("params", "scale")
                 else None)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return linear(x, kernel, bias, scale, dtype=self.param_dtype)


class RMSNorm(nn.Module):
    """weight · x / sqrt(mean(x²) + eps), computed in fp32, returned in the parameter dtype."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, weight, self.eps)


def rms_norm(x, weight, eps: float, group_size: int | None = None):
    """RMSNorm over the last axis, or over groups of `group_size` along it (gated norm)."""
    x = x.astype(f32)
    if group_size is not None and group_size != x.shape[-1]:
        *lead, d = x.shape
        xg = x.reshape(*lead, d // group_size, group_size)  # [..., g, d/g]
        xg = xg * jax.lax.rsqrt(jnp.mean(xg * xg, axis=-1, keepdims=True) + eps)
        x = xg.reshape(*lead, d)
    else:
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight * x.astype(weight.dtype)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: y_t[c] = Σ_k kernel[k, c] · x_{t−K+1+k}[c] + bias[c].

    `state` [b, K−1, c] holds the inputs before this chunk (zeros at the start of a sequence);
    the new state (the last K−1 inputs, fp32) is returned for decoding and chunked prefill.

    With `fused` (a `FusedConv`), x is the wider array the channels are read from (in place,
    columns `offset` … `offset + channels`), and the conv, bias, silu and the rounding to
    `out_dtype` run as one Pallas kernel that writes its output split in `splits`
    (`kernels/causal_conv.py`); it returns (tuple of outputs, state). Without it: fp32 y, state.
    """

    width: int
    use_bias: bool = True
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x, state=None, fused: FusedConv | None = None, segment_ids=None,
                 lengths=None):
        c = x.shape[-1] if fused is None else fused.channels
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.width, c),
                            self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
                if self.use_bias else None)
        if fused is None:
            (y,), new_state = causal_conv1d(x, kernel, bias, initial_state=state, out_dtype=f32,
                                            segment_ids=segment_ids, lengths=lengths)
            return y, new_state
        return causal_conv1d(
            x, kernel, bias, initial_state=state, offset=fused.offset, splits=fused.splits,
            activation="silu", out_dtype=fused.out_dtype, segment_ids=segment_ids,
            implementation="pallas", interpret=fused.interpret,
        )


@dataclasses.dataclass(frozen=True)
class FusedConv:
    """How `CausalConv1d` runs as one Pallas kernel: which columns of its input it reads, the
    widths of the outputs it writes, their dtype, and whether through the interpreter."""

    offset: int
    channels: int
    splits: tuple[int, ...]
    out_dtype: jnp.dtype
    interpret: bool = False

    @staticmethod
    def supported(splits) -> bool:
        return conv_block_c(splits) > 0
