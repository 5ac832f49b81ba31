"""The Mamba-1 and Mamba2 mixers as Flax modules (docs/design.md, "The mixers").

Mamba-1 (per layer; e = d_inner channels, n = d_state):
    x, z   = split(in_proj(u), [e, e])
    x      = silu(causal_conv1d(x))
    dt, B, C = split(x_proj(x), [dt_rank, n, n])
    (FalconMamba: dt, B, C = rms(dt), rms(B), rms(C), weightless RMSNorms)
    Δ      = softplus(dt_proj(dt) + dt_bias)                 # [b, l, e] fp32
    y      = selective_scan(x, Δ, A = −exp(A_log), B, C, D)  # fp32
    out    = out_proj(y · silu(z))

Mamba2 (h heads of p, g groups, n = d_state, E = h·p):
    z, xBC, dt = split(in_proj(u), [E, E + 2gn, h])
    x, B, C    = split(silu(causal_conv1d(xBC)), [E, gn, gn])
    Δ          = clamp(softplus(dt + dt_bias), dt_limit)     # [b, l, h] fp32
    y          = ssd(x, Δ, A = −exp(A_log), B, C, D)
    out        = out_proj(gated_rmsnorm(y, z, group = E/g))  # norm(y · silu(z)) per group

Both take, besides the input u [b, l, d]:
- `conv_state` [b, K−1, conv_dim], `ssm_state` (decoding / chunked prefill); new ones are returned;
- `mask` [b, l] (1 = real token): padded positions neither enter the conv window nor the state;
- `dt_filter` (is_global [channels] bool, threshold [channels]): the LongMamba filter, applied
  inside the scan; with `dt_rule` (an adaptive `SelectionRule`) the second array is the rule's
  calibrated parameter and the rule is applied to Δ in XLA before the scan;
- `decimate` (keep, keep_last): DeciMamba — keep the `keep` highest-‖Δ‖₂ tokens among the first
  l − keep_last, in order, plus the last keep_last; the SSM and its output see only those;
- `capture_dt`: also return Δ (before any filter), for calibration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longmamba_jax.config import Mamba2Config, MambaConfig
from longmamba_jax.layers import (
    CausalConv1d,
    FusedConv,
    Linear,
    RMSNorm,
    matmul_dtype,
    silu,
)
from longmamba_jax.selection import apply_document_thresholds, apply_rule
from longmamba_jax.sharding.kernels import gated_rms_norm, selective_scan, ssd
from longmamba_kernels.common import apply_gate, document_index, filter_threshold
from longmamba_kernels.gated_rmsnorm import supported as gated_norm_supported
from longmamba_kernels.selective_scan.reference import selective_state_step
from longmamba_kernels.ssd.reference import ssd_step

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ScanBackend:
    """Which kernel implementation a mixer calls (see `longmamba_jax.backends`)."""

    implementation: str = "associative"
    interpret: bool = False

    def fused_conv(self, offset, splits, out_dtype, mask, step) -> FusedConv | None:
        """How the mixer's conv runs as one Pallas kernel, or None for the jnp form: the
        kernel serves the Pallas backend's prefill, packed documents included, without a
        padding mask (that and single decode steps take the jnp form) when every output width
        is a multiple of 16."""
        if self.implementation != "pallas" or mask is not None or step:
            return None
        if not FusedConv.supported(splits):
            return None
        return FusedConv(offset, sum(splits), tuple(splits), jnp.dtype(out_dtype),
                         self.interpret)


@dataclasses.dataclass
class MixerAux:
    """What a mixer returns besides its output."""

    conv_state: Any = None
    ssm_state: Any = None
    kept: Any = None  # [b, kept] int32 positions kept by DeciMamba, else None
    dt: Any = None  # [b, l, channels] fp32 Δ when capture_dt


def decimation_indices(dt, keep: int, keep_last: int):
    """DeciMamba's choice (docs/design.md, "DeciMamba"): score = ‖Δ_t‖₂ over channels; among
    the first l − keep_last tokens take the `keep` highest scores, in their original order,
    then the last keep_last.

    dt: [b, l, channels] -> int32 [b, keep + keep_last] ascending positions.
    """
    length = dt.shape[1]
    head = length - keep_last
    score = jnp.sqrt(jnp.sum(jnp.square(dt[:, :head]), axis=-1))  # [b, head]
    _, top = jax.lax.top_k(score, keep)  # ties -> lower index first
    top = jnp.sort(top, axis=-1)
    tail = jnp.broadcast_to(jnp.arange(head, length), (dt.shape[0], keep_last))
    return jnp.concatenate([top, tail], axis=-1).astype(jnp.int32)


def weightless_rms_norm(x, eps: float):
    """x / sqrt(mean(x²) + eps) over the last axis, in fp32, returned in x's dtype (FalconMamba's
    norms on Δ's input, B and C)."""
    x32 = x.astype(f32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _adaptive(rule, dt_filter, step) -> bool:
    """Whether a prompt-adaptive selection rule runs in this call (never in a decode step)."""
    if rule is None or dt_filter is None or not rule.adaptive:
        return False
    if step:
        raise ValueError(f"the LongMamba rule {rule.kind!r} reads the whole prompt's Δ; decode "
                         "steps cannot be filtered with it")
    return True


def _take(a, idx):
    """Gathers positions idx [b, k] along axis 1 of a [b, l, ...]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def row_ends(mask):
    """mask [b, l] (1 = real token) -> int32 [b]: one past each row's last real token (l for a
    left-padded row); None for None. Padding after it neither enters the state nor the conv
    window that decoding continues from."""
    if mask is None:
        return None
    length = mask.shape[1]
    return (length - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)


def _apply_mask(a, mask):
    return a if mask is None else a * mask[..., None].astype(a.dtype)


class DtProj(nn.Module):
    """Mamba-1's Δ: softplus(dt_raw @ kernel + bias); the matmul in the parameter dtype, the bias
    and softplus in fp32 (as torch adds the bias inside the scan). With `raw=True` it returns
    (dt_raw @ kernel, bias) for a scan that adds the bias and applies softplus itself."""

    features: int
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, dt_raw, *, raw=False):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (dt_raw.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        dt = jnp.einsum("...r,re->...e", dt_raw.astype(kernel.dtype), kernel,
                        preferred_element_type=matmul_dtype(kernel.dtype)).astype(kernel.dtype)
        if raw:
            return dt, bias
        return jax.nn.softplus(dt.astype(f32) + bias.astype(f32))


class Mamba1Mixer(nn.Module):
    config: MambaConfig
    backend: ScanBackend = ScanBackend()
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, u, *, conv_state=None, ssm_state=None, mask=None, dt_filter=None,
                 dt_rule=None, decimate=None, capture_dt=False, step=False, segment_ids=None):
        cfg, pd = self.config, self.param_dtype
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        xz = Linear(2 * e, cfg.bias, pd, name="in_proj")(u)  # [b, l, 2e]
        x, z = jnp.split(xz, 2, axis=-1)
        conv = CausalConv1d(cfg.d_conv, cfg.conv_bias, pd, name="conv1d")
        fused = self.backend.fused_conv(0, (e,), pd, mask, step)
        if fused is not None:  # conv + silu in one kernel, x read in place from xz
            (x,), conv_state = conv(xz, conv_state, fused=fused, segment_ids=segment_ids)
        else:
            x, conv_state = conv(_apply_mask(x, mask), conv_state, segment_ids=segment_ids,
                                 lengths=row_ends(mask))
            x = _apply_mask(silu(x), mask).astype(pd)  # [b, l, e]
        dt_raw, B, C = jnp.split(Linear(r + 2 * n, False, pd, name="x_proj")(x), [r, r + n], -1)
        if cfg.mixer_rms_eps is not None:  # FalconMamba: weightless RMSNorms on Δ's input, B, C
            dt_raw, B, C = (weightless_rms_norm(a, cfg.mixer_rms_eps) for a in (dt_raw, B, C))
        A_log = self.param("A_log", lambda k, s: jnp.log(jnp.broadcast_to(
            jnp.arange(1, n + 1, dtype=f32), s)).astype(pd), (e, n))
        D = self.param("D", nn.initializers.ones, (e,), pd)
        A = -jnp.exp(A_log.astype(f32))  # [e, n]
        glob, thr = dt_filter if dt_filter is not None else (None, None)
        adaptive = _adaptive(dt_rule, dt_filter, step)
        per_document = thr is not None and thr.ndim == 3  # [b, documents, e]
        if not (step or capture_dt or mask is not None or decimate is not None or adaptive
                or per_document):
            # Δ's bias and softplus before the scan and the gate after it, in the scan call:
            # the Pallas kernel does both in place (Δ never written in fp32, y written once, in
            # the parameter dtype); the other implementations compute the same around the scan.
            dt_lin, dt_bias = DtProj(e, pd, name="dt_proj")(dt_raw, raw=True)
            y, ssm_state = selective_scan(
                x, dt_lin, A, B, C, D, initial_state=ssm_state, dt_global=glob,
                dt_threshold=thr, dt_bias=dt_bias, dt_softplus=True, z=xz, out_dtype=pd,
                segment_ids=segment_ids, implementation=self.backend.implementation,
                interpret=self.backend.interpret,
            )
            aux = MixerAux(conv_state=conv_state, ssm_state=ssm_state)
            return Linear(cfg.d_model, cfg.bias, pd, name="out_proj")(y), aux
        dt = DtProj(e, pd, name="dt_proj")(dt_raw)  # [b, l, e] fp32
        dt = _apply_mask(dt, mask)
        aux = MixerAux(dt=dt if capture_dt else None)
        if adaptive:
            dt, glob, thr = apply_rule(dt, glob, thr, dt_rule), None, None
        elif per_document:
            dt = apply_document_thresholds(dt, glob, thr, document_index(segment_ids))
            glob, thr = None, None
        if decimate is not None:
            aux.kept = decimation_indices(dt, *decimate)
            x, z, dt, B, C = (_take(a, aux.kept) for a in (x, z, dt, B, C))
        if step:
            threshold = filter_threshold(glob, thr, e)
            y, ssm_state = selective_state_step(
                ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, threshold=threshold
            )
            y = y[:, None]
        else:
            y, ssm_state = selective_scan(
                x, dt, A, B, C, D, initial_state=ssm_state, dt_global=glob, dt_threshold=thr,
                segment_ids=segment_ids, implementation=self.backend.implementation,
                interpret=self.backend.interpret,
            )
        y = apply_gate(y, z)
        aux.conv_state, aux.ssm_state = conv_state, ssm_state
        return Linear(cfg.d_model, cfg.bias, pd, name="out_proj")(y.astype(pd)), aux


class GatedRMSNorm(nn.Module):
    """norm(y · silu(z)) per group of `group_size` channels (mamba_ssm RMSNormGated with
    norm_before_gate=False). z may be wider than y (the gate is its first y.shape[-1] columns).

    With the Pallas backend and one group per row of a power-of-two width, it runs as one
    kernel (`kernels/gated_rmsnorm.py`: one pass instead of XLA's two); otherwise in jnp."""

    group_size: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = f32
    backend: ScanBackend = ScanBackend()

    @nn.compact
    def __call__(self, y, z):
        e = y.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (e,), self.param_dtype)
        pallas = (self.backend.implementation == "pallas"
                  and gated_norm_supported(e, self.group_size))
        return gated_rms_norm(y, z, weight, eps=self.eps, group_size=self.group_size,
                              implementation="pallas" if pallas else "reference",
                              interpret=self.backend.interpret)


class Mamba2Mixer(nn.Module):
    config: Mamba2Config
    backend: ScanBackend = ScanBackend()
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, u, *, conv_state=None, ssm_state=None, mask=None, dt_filter=None,
                 dt_rule=None, decimate=None, capture_dt=False, step=False, segment_ids=None):
        cfg, pd = self.config, self.param_dtype
        E, h, p, g, n = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        b, length, _ = u.shape
        zxbcdt = Linear(cfg.in_proj_dim, cfg.bias, pd, name="in_proj")(u)
        z, xBC, dt = jnp.split(zxbcdt, [E, E + cfg.conv_dim], axis=-1)
        conv = CausalConv1d(cfg.d_conv, cfg.conv_bias, pd, name="conv1d")
        fused = self.backend.fused_conv(E, (E, g * n, g * n), pd, mask, step)
        if fused is not None:  # conv + silu in one kernel: xBC read in place, x, B, C written
            (x, B, C), conv_state = conv(zxbcdt, conv_state, fused=fused,
                                         segment_ids=segment_ids)
        else:
            xBC, conv_state = conv(_apply_mask(xBC, mask), conv_state, segment_ids=segment_ids,
                                   lengths=row_ends(mask))
            xBC = _apply_mask(silu(xBC), mask).astype(pd)
            x, B, C = jnp.split(xBC, [E, E + g * n], axis=-1)
        dt_bias = self.param("dt_bias", nn.initializers.zeros, (h,), pd)
        A_log = self.param("A_log", lambda k, s: jnp.log(jnp.arange(1, h + 1, dtype=f32))
                           .astype(pd), (h,))
        D = self.param("D", nn.initializers.ones, (h,), pd)
        A = -jnp.exp(A_log.astype(f32))  # [h]
        dt = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))  # [b, l, h]
        lo, hi = cfg.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = jnp.clip(dt, lo, hi)
        dt = _apply_mask(dt, mask)
        aux = MixerAux(dt=dt if capture_dt else None)
        if decimate is not None:
            aux.kept = decimation_indices(dt, *decimate)
            x, z, dt, B, C = (_take(a, aux.kept) for a in (x, z, dt, B, C))
            length = aux.kept.shape[1]
        glob, thr = dt_filter if dt_filter is not None else (None, None)
        if _adaptive(dt_rule, dt_filter, step):
            dt, glob, thr = apply_rule(dt, glob, thr, dt_rule), None, None
        elif thr is not None and thr.ndim == 3:  # one θ per packed document
            dt = apply_document_thresholds(dt, glob, thr, document_index(segment_ids))
            glob, thr = None, None
        x = x.reshape(b, length, h, p)
        B, C = B.reshape(b, length, g, n), C.reshape(b, length, g, n)
        if step:
            threshold = filter_threshold(glob, thr, h)
            y, ssm_state = ssd_step(
                ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, threshold=threshold
            )
            y = y[:, None]
        else:
            y, ssm_state = ssd(
                x, dt, A, B, C, D, chunk_size=cfg.chunk_size, initial_state=ssm_state,
                dt_global=glob, dt_threshold=thr, segment_ids=segment_ids,
                implementation=self.backend.implementation, interpret=self.backend.interpret,
            )
        y = y.reshape(b, length, E)
        # z is the first E columns of zxbcdt: pass the whole array (no copy of the slice)
        gate = z if decimate is not None else zxbcdt
        y = GatedRMSNorm(E // g, cfg.norm_eps, pd, self.backend, name="norm")(y, gate)
        aux.conv_state, aux.ssm_state = conv_state, ssm_state
        return Linear(cfg.d_model, cfg.bias, pd, name="out_proj")(y.astype(pd)), aux


class Block(nn.Module):
    """x + mixer(rmsnorm(x)) with the residual stream x in fp32."""

    config: MambaConfig | Mamba2Config
    backend: ScanBackend = ScanBackend()
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, x, **kwargs):
        mixer_cls = Mamba2Mixer if isinstance(self.config, Mamba2Config) else Mamba1Mixer
        normed = RMSNorm(self.config.norm_eps, self.param_dtype, name="norm")(
            x.astype(self.param_dtype)
        )
        out, aux = mixer_cls(self.config, self.backend, self.param_dtype, name="mixer")(
            normed, **kwargs
        )
        if aux.kept is not None:
            x = _take(x, aux.kept)
        return x.astype(f32) + out.astype(f32), aux
