"""One Mamba2 decode step of a layer's SSM part as one Pallas GPU kernel (Triton lowering),
everything between in_proj and the gated RMSNorm:

    z, xBC, dt = split(zxbcdt, [E, E + 2gn, h])                     # in_proj output, one token
    xBC  = silu(Σ_k w[k] · [conv_state, xBC][k] + bias)              # causal conv, window of K
    x, B, C = split(xBC, [E, gn, gn])                                # rounded to zxbcdt's dtype
    Δ    = softplus(dt + dt_bias), clamped to dt_limit;  Δ := 0 where Δ <= threshold
    S    = exp(Δ A) S + Δ x ⊗ B                                      # per head: [p, n]
    g    = (S C + D x) · silu(z)                                     # [h, p] fp32

returning g (the gated RMSNorm's input), the new conv window (the last K − 1 inputs) and the
new state. Notation: b batch, h heads of p, g groups (head i reads group i // (h/g)), n state,
K conv width, E = h·p.

Kernel design: one program per (batch, head); it reads its head's x/z/Δ slice of zxbcdt and its
group's B/C slices, the conv windows of those channels, and its [p, n] state; writes g and the
state in place (`input_output_aliases`: the state buffer is the caller's, typically the whole
stacked cache [n_layer, b, h, p, n] with `layer` picking the slice, so nothing is copied or
re-stacked). The conv window goes to a fresh buffer: B and C channels are shared by the heads of
a group, so an in-place update would race with another head's read of the old window (every
program of a group writes the same B/C values into the fresh buffer: a benign duplicate write).

`implementation="reference"` is the same step in plain jnp (fp32 ground truth), with the same
signature; "pallas" needs p and n to be powers of two (Triton tile shapes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32
IMPLEMENTATIONS = ("reference", "pallas")


@dataclasses.dataclass(frozen=True)
class SSDStepConfig:
    """Launch parameters of the step kernel: warps per (batch, head) program."""

    num_warps: int = 4


def _silu(x):
    return x * (1.0 / (1.0 + jnp.exp(-x)))


def _softplus(x):
    # jax.nn.softplus = logaddexp(x, 0), written out (the same formula in both implementations)
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _dt(dt_raw, dt_bias, dt_limit, threshold):
    dt = _softplus(dt_raw.astype(f32) + dt_bias.astype(f32))
    lo, hi = dt_limit
    if (lo, hi) != (0.0, float("inf")):
        dt = jnp.clip(dt, lo, hi)
    return jnp.where(dt <= threshold, 0.0, dt)


# ----------------------------------------------------------------------------------------------
# Kernel


def _step_kernel(
    zx_ref, conv_ref, cw_ref, cb_ref, dtb_ref, a_ref, d_ref, thr_ref, s_ref,  # inputs
    g_ref, conv_out_ref, s_out_ref,  # outputs (s_out_ref aliases s_ref)
    *, layer, E, P, N, G, heads_per_group, K, has_bias, has_d, dt_limit, xbc_dtype,
):
    del s_ref  # read through its alias
    bi, hi = pl.program_id(0), pl.program_id(1)
    gi = hi // heads_per_group
    conv_dim = E + 2 * G * N

    def conv(ch, size):
        """silu(causal conv) of channels [ch, ch + size) of xBC; writes their new window."""
        sl = pl.ds(ch, size)
        new = zx_ref[bi, pl.ds(E + ch, size)].astype(f32)  # [size]
        acc = None
        for k in range(K - 1):
            old = conv_ref[layer, bi, k, sl]  # [size] fp32
            term = old * cw_ref[k, sl].astype(f32)
            acc = term if acc is None else acc + term
            if k > 0:
                conv_out_ref[bi, k - 1, sl] = old
        acc = acc + new * cw_ref[K - 1, sl].astype(f32)
        conv_out_ref[bi, K - 2, sl] = new
        if has_bias:
            acc = acc + cb_ref[sl].astype(f32)
        return _silu(acc).astype(xbc_dtype).astype(f32)  # the mixer rounds xBC to its dtype

    x = conv(hi * P, P)  # [p]
    B = conv(E + gi * N, N)  # [n]
    C = conv(E + G * N + gi * N, N)  # [n]
    dt = _dt(zx_ref[bi, E + conv_dim + hi], dtb_ref[hi], dt_limit, thr_ref[hi])  # scalar
    s = s_out_ref[layer, bi, hi, :, :]  # [p, n] fp32
    s = jnp.exp(dt * a_ref[hi]) * s + (dt * x)[:, None] * B[None, :]
    y = jnp.sum(s * C[None, :], axis=1)  # [p]
    if has_d:
        y = y + d_ref[hi].astype(f32) * x
    z = zx_ref[bi, pl.ds(hi * P, P)].astype(f32)
    g_ref[bi, hi, :] = y * _silu(z)
    s_out_ref[layer, bi, hi, :, :] = s


def _pallas_step(zx, conv, cw, cb, dt_bias, A, D, thr, ssm, *, layer, ngroups, headdim, d_state,
                 dt_limit, interpret, config):
    b = zx.shape[0]
    h = A.shape[0]
    p, n, G = headdim, d_state, ngroups
    E = h * p
    K = cw.shape[0]
    for name, v in (("headdim", p), ("d_state", n)):
        if v & (v - 1):
            raise ValueError(f"the Pallas step kernel needs a power-of-two {name}, got {v}; "
                             "use implementation='reference'")
    has_bias, has_d = cb is not None, D is not None
    kernel = functools.partial(
        _step_kernel, layer=layer, E=E, P=p, N=n, G=G, heads_per_group=h // G, K=K,
        has_bias=has_bias, has_d=has_d, dt_limit=dt_limit, xbc_dtype=zx.dtype,
    )
    cb = cb if has_bias else jnp.zeros((1,), f32)
    D = D if has_d else jnp.zeros((1,), f32)
    from jax.experimental.pallas import triton as plgpu

    g, conv_new, ssm = pl.pallas_call(
        kernel,
        grid=(b, h),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, p), f32),
            jax.ShapeDtypeStruct((b, K - 1, conv.shape[-1]), f32),
            jax.ShapeDtypeStruct(ssm.shape, f32),
        ],
        input_output_aliases={8: 2},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="ssd_decode_step",
    )(zx, conv, cw, cb, dt_bias, A.astype(f32), D, thr, ssm)
    return g, conv_new, ssm


# ----------------------------------------------------------------------------------------------
# Reference


def ssd_decode_step_reference(zx, conv, cw, cb, dt_bias, A, D, thr, ssm, *, layer, ngroups,
                              headdim, d_state, dt_limit):
    """The same step in plain jnp (fp32); same arguments and results as the kernel."""
    b = zx.shape[0]
    h = A.shape[0]
    p, n, G = headdim, d_state, ngroups
    E = h * p
    K = cw.shape[0]
    conv_dim = E + 2 * G * n
    z, xbc, dt_raw = jnp.split(zx, [E, E + conv_dim], axis=-1)
    window = jnp.concatenate([conv[layer].astype(f32), xbc.astype(f32)[:, None]], axis=1)
    acc = sum(window[:, k] * cw[k].astype(f32) for k in range(K))  # [b, conv_dim]
    if cb is not None:
        acc = acc + cb.astype(f32)
    xbc = _silu(acc).astype(zx.dtype).astype(f32)
    x, B, C = jnp.split(xbc, [E, E + G * n], axis=-1)
    x = x.reshape(b, h, p)
    B = jnp.repeat(B.reshape(b, G, n), h // G, axis=1)  # [b, h, n]
    C = jnp.repeat(C.reshape(b, G, n), h // G, axis=1)
    dt = _dt(dt_raw, dt_bias, dt_limit, thr)  # [b, h]
    s = ssm[layer]  # [b, h, p, n]
    s = jnp.exp(dt * A.astype(f32))[..., None, None] * s + (dt[..., None] * x)[..., None] \
        * B[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", s, C, precision=jax.lax.Precision.HIGHEST)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x
    g = y * _silu(z.astype(f32).reshape(b, h, p))
    return g, window[:, 1:], ssm.at[layer].set(s)


# ----------------------------------------------------------------------------------------------
# Public entry point


def ssd_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A, D=None,
                    threshold=None, *, layer: int | None = None, ngroups: int, headdim: int,
                    d_state: int, dt_limit=(0.0, float("inf")), implementation: str = "reference",
                    interpret: bool = False, config: SSDStepConfig | None = None):
    """One decode step of a Mamba2 layer's conv + SSM + gate (see the module docstring).

    Args:
      zxbcdt: [b, 2E + 2gn + h] the layer's in_proj output for one token (its dtype is the
        model's: xBC is rounded to it after the conv, as the mixer does).
      conv_state: [b, K−1, conv_dim] fp32, or [n_layer, b, K−1, conv_dim] with `layer`.
      ssm_state: [b, h, p, n] fp32, or [n_layer, b, h, p, n] with `layer` (updated there only;
        the Pallas kernel writes it in place when the caller donates / no longer uses it).
      conv_weight: [K, conv_dim]; conv_bias: [conv_dim] or None; dt_bias: [h]; A: [h] fp32
        (= −exp(A_log)); D: [h] or None; threshold: [h] fp32 folded LongMamba filter (−inf on
        local channels) or None.
      layer: which slice of stacked states to use (static), or None for unstacked states.
      ngroups, headdim, d_state: g, p, n. dt_limit: (low, high) clamp of Δ.
      implementation: "reference" (jnp) or "pallas"; interpret: Pallas interpreter (any
        platform). config: `SSDStepConfig`.

    Returns:
      (g [b, h, p] fp32 = (S C + D x)·silu(z), new conv window [b, K−1, conv_dim] fp32,
       ssm_state with the layer's new state, same shape as given).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown step implementation {implementation!r}; choose one of "
                         f"{IMPLEMENTATIONS}")
    stacked = layer is not None
    if not stacked:
        conv_state, ssm_state, layer = conv_state[None], ssm_state[None], 0
    h = A.shape[0]
    thr = jnp.full((h,), -jnp.inf, f32) if threshold is None else threshold.astype(f32)
    kw = dict(layer=layer, ngroups=ngroups, headdim=headdim, d_state=d_state,
              dt_limit=tuple(float(v) for v in dt_limit))
    if conv_weight.shape[0] < 2:
        raise ValueError(f"conv width must be >= 2, got {conv_weight.shape[0]}")
    if implementation == "reference":
        g, conv_new, ssm = ssd_decode_step_reference(
            zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A, D, thr, ssm_state, **kw)
    else:
        g, conv_new, ssm = _pallas_step(
            zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A, D, thr, ssm_state,
            interpret=interpret, config=config or SSDStepConfig(), **kw)
    return g, conv_new, (ssm if stacked else ssm[0])
