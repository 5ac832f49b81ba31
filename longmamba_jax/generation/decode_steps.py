"""The recurrent decode step with its layers unrolled (opt-in:
`generate(..., decode_impl="unrolled")`).

The default step (`apply_model(..., step=True)`) runs the n_layer blocks under one `lax.scan`
over the stacked weights [n_layer, ...]. Inside the decode `while_loop` that is a loop in a loop:
every layer trip dynamic-slices its weights out of the stacked arrays, and XLA:GPU checks the
inner loop's condition on the host at every trip. At batch 1 a step is bound by those launches
and syncs, not by the bytes it must read (all weights once, ~2.7 GB for a 1.3B model in bf16,
~0.9 ms at 3 TB/s on an H100).

Here the stacked weights are split into n_layer per-layer pytrees once, before the decode loop
(`split_layers`: one copy of the layer weights per `generate` call, kept for the whole loop),
and the step is a straight line of n_layer blocks (`step_unrolled`): no inner loop, no dynamic
slices, static per-layer cache slices. Same blocks, same math, same order as the scan step:

    h = embed(token);  for i < n_layer: h, (conv_i, ssm_i) = block_i(h, conv_i, ssm_i)
    logits = lm_head(rmsnorm(h))

Cost: a bigger program (n_layer copies of the block: longer compile) and the weights held twice
while the loop runs.

`decode_impl="fused"` (`step_fused`) is the same straight line written directly on the weights
instead of through the Flax blocks, shaped for few and lean kernels per layer:

    u = rmsnorm(h);  zxbcdt = u @ in_proj                                  # XLA: norm, GEMM
    g, conv_i, ssm = ssd_decode_step(zxbcdt, conv, ssm, layer=i)            # Mamba2: 1 kernel
    h = h + gated_rmsnorm(g) @ out_proj                                      # XLA: norm, GEMM

- Mamba2's conv + Δ + LongMamba filter + state update + y·C + D·x + silu(z) gate are one Pallas
  kernel per layer (`longmamba_kernels.ssd.step`, on the "pallas" backend; its jnp reference on
  the others), which updates the stacked SSM cache in place (no per-step re-stacking of
  n_layer states); Mamba-1 runs the same recurrence in jnp (`selective_state_step`), its state
  written back with an in-place dynamic-update-slice.
- Every projection at batch 1 pads its one row to two (`_linear`): XLA:GPU rewrites a
  vector × matrix product whose (i + o)·i is under 10M elements (out_proj 4096×2048) into a
  multiply + reduce, and on the H100 that multiply was emitted as its own kernel writing a
  [4096, 2048] fp32 product (32 MiB written and read back per layer: ~1.2 ms of the 3.5 ms
  step, docs/kernels.md, "Decode step"). Two rows keep it a GEMM.
- Loop-invariant per-layer arrays (A = −exp(A_log), the folded LongMamba thresholds) are
  computed once, before the decode loop (`prepare_fused`).
Same math and the same rounding points as the Flax block (tests/test_decode_kernel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.config import Mamba2Config
from longmamba_jax.layers import int8_matmul, rms_norm, silu
from longmamba_jax.mixers import Block, ScanBackend, weightless_rms_norm
from longmamba_jax.model import Cache, LayerFilters, Params, lm_head
from longmamba_kernels.common import filter_threshold
from longmamba_kernels.selective_scan.reference import selective_state_step
from longmamba_kernels.ssd.step import ssd_decode_step

f32 = jnp.float32

DECODE_IMPLS = ("scan", "unrolled", "fused")


def split_layers(params: Params) -> tuple[dict, ...]:
    """The stacked layer weights as a tuple of n_layer per-layer pytrees (static slices)."""
    layers = params.weights["layers"]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(params.config.n_layer))


def step_unrolled(params: Params, layers: tuple[dict, ...], cache: Cache, token,
                  filters: LayerFilters | None, backend: ScanBackend):
    """One recurrent step, layers unrolled: token int32 [b] -> (logits fp32 [b, V], new cache).

    Args:
      params: `Params` (embedding, final norm, head and the config are read from it).
      layers: `split_layers(params)`, computed once outside the decode loop.
      cache: `Cache` (conv [n_layer, b, K−1, conv_dim], ssm [n_layer, b, ...]).
      token: int32 [b].
      filters: LongMamba per-layer filter arrays (filter_decode), or None.
      backend: resolved `ScanBackend` (the step is a plain recurrence on every backend).
    """
    cfg = params.config
    w = params.weights
    block = Block(cfg, backend, params.dtype)
    h = jnp.take(w["embedding"]["weight"], token[:, None], axis=0).astype(f32)  # [b, 1, d]
    convs, ssms = [], []
    for i, layer in enumerate(layers):
        dt_filter = None if filters is None else (filters.is_global[i], filters.threshold[i])
        h, aux = block.apply({"params": layer}, h, conv_state=cache.conv[i],
                             ssm_state=cache.ssm[i], dt_filter=dt_filter, step=True)
        convs.append(aux.conv_state)
        ssms.append(aux.ssm_state)
    return lm_head(params, h)[:, 0], Cache(jnp.stack(convs), jnp.stack(ssms))


# ----------------------------------------------------------------------------------------------
# decode_impl="fused"


def prepare_fused(params: Params, filters: LayerFilters | None) -> tuple[dict, ...]:
    """Per-layer pytrees for `step_fused`, computed once outside the decode loop: the layer's
    weights (static slices), A = −exp(A_log) fp32 and the folded LongMamba threshold (None
    when decode steps are unfiltered)."""
    cfg = params.config
    out = []
    for i, layer in enumerate(split_layers(params)):
        mixer = layer["mixer"]
        prep = {"w": layer, "A": -jnp.exp(mixer["A_log"].astype(f32)), "threshold": None}
        if filters is not None:
            prep["threshold"] = filter_threshold(filters.is_global[i], filters.threshold[i],
                                                 cfg.channels)
        out.append(prep)
    return tuple(out)


def _linear(x, w: dict, dtype):
    """x [b, i] @ kernel [i, o] (+ bias), fp32 accumulation, rounded to `dtype` (as
    `layers.Linear`; an int8 kernel times its "scale", `layers.int8_matmul`). One row is padded
    to two: see the module docstring (XLA's vector × matrix rewrite)."""
    kernel = w["kernel"]
    b = x.shape[0]
    xp = jnp.pad(x, ((0, 1), (0, 0))) if b == 1 else x
    if "scale" in w:
        y = int8_matmul(xp, kernel, w["scale"], dtype)[:b]  # [b, o] fp32
    else:
        y = jnp.einsum("bi,io->bo", xp.astype(kernel.dtype), kernel,
                       preferred_element_type=f32)[:b]  # [b, o]
    if "bias" in w:
        y = y + w["bias"]
    return y.astype(dtype)


def _conv_step(x, conv_state, w: dict):
    """Depthwise causal conv of one token: x [b, c], conv_state [b, K−1, c] fp32 ->
    (out [b, c] fp32, new window [b, K−1, c]); the sum in `layers.CausalConv1d`'s order."""
    kernel = w["kernel"]
    window = jnp.concatenate([conv_state.astype(f32), x.astype(f32)[:, None]], axis=1)
    y = sum(window[:, k] * kernel[k].astype(f32) for k in range(kernel.shape[0]))
    if "bias" in w:
        y = y + w["bias"].astype(f32)
    return y, window[:, 1:]


def _mamba2_mixer_step(cfg: Mamba2Config, prep: dict, u, conv, ssm, i: int, backend):
    w = prep["w"]["mixer"]
    pd = u.dtype  # the parameter dtype (the kernels may be int8)
    zxbcdt = _linear(u, w["in_proj"], pd)  # [b, in_proj_dim]
    g, conv_i, ssm = ssd_decode_step(
        zxbcdt, conv, ssm, w["conv1d"]["kernel"], w["conv1d"].get("bias"), w["dt_bias"],
        prep["A"], w["D"], prep["threshold"], layer=i, ngroups=cfg.ngroups,
        headdim=cfg.headdim, d_state=cfg.d_state, dt_limit=cfg.dt_limit,
        implementation="pallas" if backend.implementation == "pallas" else "reference",
        interpret=backend.interpret,
    )  # g [b, h, p] fp32
    b = u.shape[0]
    y = rms_norm(g.reshape(b, cfg.d_inner), w["norm"]["weight"], cfg.norm_eps,
                 cfg.d_inner // cfg.ngroups)  # [b, E] pd
    return _linear(y.astype(pd), w["out_proj"], pd), conv_i, ssm


def _mamba1_mixer_step(cfg, prep: dict, u, conv, ssm, i: int):
    w = prep["w"]["mixer"]
    pd = u.dtype  # the parameter dtype (the kernels may be int8)
    n, r = cfg.d_state, cfg.dt_rank
    x, z = jnp.split(_linear(u, w["in_proj"], pd), 2, axis=-1)  # [b, e] each
    x, conv_i = _conv_step(x, conv[i], w["conv1d"])
    x = silu(x).astype(pd)
    dt_raw, B, C = jnp.split(_linear(x, w["x_proj"], pd), [r, r + n], axis=-1)
    if cfg.mixer_rms_eps is not None:  # FalconMamba
        dt_raw, B, C = (weightless_rms_norm(a, cfg.mixer_rms_eps) for a in (dt_raw, B, C))
    dt = _linear(dt_raw, {"kernel": w["dt_proj"]["kernel"]}, pd)  # the DtProj matmul, rounded
    dt = jax.nn.softplus(dt.astype(f32) + w["dt_proj"]["bias"].astype(f32))  # [b, e]
    y, s = selective_state_step(ssm[i], x, dt, prep["A"], B, C, w["D"],
                                threshold=prep["threshold"])
    y = y * silu(z.astype(f32))
    return _linear(y.astype(pd), w["out_proj"], pd), conv_i, ssm.at[i].set(s)


def step_fused(params: Params, prepared: tuple[dict, ...], cache: Cache, token,
               backend: ScanBackend):
    """One recurrent step, layers unrolled, written on the weights: token int32 [b] ->
    (logits fp32 [b, V], new cache). `prepared` = `prepare_fused(params, filters)`."""
    cfg = params.config
    w = params.weights
    h = jnp.take(w["embedding"]["weight"], token, axis=0).astype(f32)  # [b, d] residual
    ssm, convs = cache.ssm, []
    for i, prep in enumerate(prepared):
        pd = prep["w"]["norm"]["weight"].dtype
        u = rms_norm(h.astype(pd), prep["w"]["norm"]["weight"], cfg.norm_eps)  # [b, d] pd
        if isinstance(cfg, Mamba2Config):
            out, conv_i, ssm = _mamba2_mixer_step(cfg, prep, u, cache.conv, ssm, i, backend)
        else:
            out, conv_i, ssm = _mamba1_mixer_step(cfg, prep, u, cache.conv, ssm, i)
        h = h + out.astype(f32)
        convs.append(conv_i)
    return lm_head(params, h[:, None])[:, 0], Cache(jnp.stack(convs), ssm)
