"""Bamba (docs/families.md, "Bamba"): decoder layers of a Mamba2 or an attention mixer, each
followed by a SwiGLU MLP.

    mixer layer ("m" / "a"):  h = h + mixer(rmsnorm(h));  h = h + mlp(rmsnorm'(h))
    mlp(x) = down(silu(gate(x)) · up(x));  logits = lm_head(rmsnorm(h))
Attention: grouped-query heads of d_model / n_heads, rotary embedding on the first half of
each head. Weights: embedding, layers (the Mamba2 layers stacked: norm, mixer,
pre_ff_layernorm, feed_forward), attn_layers (the attention layers stacked:
input_layernorm, self_attn, pre_ff_layernorm, feed_forward), norm_f, lm_head (untied only).
Each run of consecutive Mamba2 layers runs under one `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.hybrid.config import BambaConfig
from longmamba_jax.hybrid.layers import (
    AttentionSpec,
    activation,
    attention_sublayer,
    dense,
    init_mamba_layers,
    kv_state,
    layer_inputs,
    linear,
    mamba_layer,
    new_cache,
    norm,
    ones,
    run_layers,
)
from longmamba_jax.mixers import Mamba2Mixer

f32 = jnp.float32


def attention_spec(cfg: BambaConfig) -> AttentionSpec:
    return AttentionSpec(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, scale=cfg.head_dim ** -0.5,
                         rotary_dim=cfg.rotary_dim, rope_theta=cfg.rope_theta)


def _mlp_init(keys, n: int, cfg: BambaConfig, dtype) -> dict:
    d, f = cfg.d_model, cfg.ffn_dim
    return {"gate_proj": dense(next(keys), (n, d, f), dtype, cfg.mlp_bias),
            "up_proj": dense(next(keys), (n, d, f), dtype, cfg.mlp_bias),
            "down_proj": dense(next(keys), (n, f, d), dtype, cfg.mlp_bias)}


def init_bamba(cfg: BambaConfig, key, dtype) -> dict:
    """Random weights with transformers' Bamba shapes (see the module docstring for the tree)."""
    k = iter(jax.random.split(key, 16))
    d, nm, na = cfg.d_model, cfg.n_ssm_layer, len(cfg.attention_layers)
    hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    weights = {
        "embedding": {"weight": (0.02 * jax.random.normal(next(k), (cfg.padded_vocab_size, d)))
                      .astype(dtype)},
        "norm_f": ones((d,), dtype),
    }
    if nm:
        weights["layers"] = {**init_mamba_layers(cfg.mamba, next(k), nm, dtype),
                             "pre_ff_layernorm": ones((nm, d), dtype),
                             "feed_forward": _mlp_init(k, nm, cfg, dtype)}
    if na:
        bias = cfg.attn_bias
        weights["attn_layers"] = {
            "input_layernorm": ones((na, d), dtype),
            "self_attn": {"q_proj": dense(next(k), (na, d, hq), dtype, bias),
                          "k_proj": dense(next(k), (na, d, hkv), dtype, bias),
                          "v_proj": dense(next(k), (na, d, hkv), dtype, bias),
                          "o_proj": dense(next(k), (na, hq, d), dtype, bias)},
            "pre_ff_layernorm": ones((na, d), dtype),
            "feed_forward": _mlp_init(k, na, cfg, dtype),
        }
    if not cfg.tie_embeddings:
        weights["lm_head"] = {"kernel": (0.02 * jax.random.normal(
            next(k), (d, cfg.padded_vocab_size))).astype(dtype)}
    return weights


def _mlp(cfg: BambaConfig, h, w: dict):
    """h + down(act(gate(x)) · up(x)), x = rmsnorm(h)."""
    x = norm(h, w["pre_ff_layernorm"], cfg.norm_eps)
    ffn = w["feed_forward"]
    y = activation(cfg.hidden_act, linear(x, ffn["gate_proj"])) * linear(x, ffn["up_proj"])
    return h + linear(y, ffn["down_proj"]).astype(f32)


def _runs(cfg: BambaConfig):
    """[(kind, first slot, count)] of the runs of consecutive layers of one kind, in order."""
    out = []
    slots = {"m": 0, "a": 0}
    for kind in cfg.layer_pattern:
        if out and out[-1][0] == kind:
            out[-1][2] += 1
        else:
            out.append([kind, slots[kind], 1])
        slots[kind] += 1
    return out


def bamba_body(params, tokens, *, mask, filters, rule, cache, fresh, backend, return_cache,
               capture_dt, step):
    """(residual stream after the last layer, new `HybridCache` or None, Δ or None); `cache`
    holds the states to start from (`fresh`: zeros and no KV cache). See `apply_hybrid`."""
    cfg: BambaConfig = params.config
    w, pd = params.weights, params.dtype
    b, l = tokens.shape
    h = jnp.take(w["embedding"]["weight"], tokens, axis=0).astype(f32)  # [b, l, d]
    mixer = Mamba2Mixer(cfg.mamba, backend, pd)
    spec = attention_spec(cfg)
    state, kv_valid = kv_state(None if fresh else cache, mask, b, l)
    convs, ssms, dts, keys, values = [], [], [], [], []

    def mamba_body(h, x):
        h, ys = mamba_layer(h, x, mixer=mixer, eps=cfg.norm_eps, mask=mask, rule=rule,
                            capture_dt=capture_dt, step=step)
        return _mlp(cfg, h, x["params"]), ys

    for kind, first, count in _runs(cfg):
        if kind == "m":
            xs = layer_inputs(w["layers"], cache.conv, cache.ssm, filters, first, first + count)
            h, ys = run_layers(mamba_body, h, xs, count)
            convs.append(ys[0])
            ssms.append(ys[1])
            dts.append(ys[2])
            continue
        for j in range(first, first + count):
            p = jax.tree.map(lambda a, j=j: a[j], w["attn_layers"])
            kv = (cache.keys[j], cache.values[j]) if state.cached else None
            a, (k, v) = attention_sublayer(norm(h, p["input_layernorm"], cfg.norm_eps),
                                           p["self_attn"], spec, state, kv)
            h = _mlp(cfg, h + a.astype(f32), p)
            keys.append(k)
            values.append(v)
    new = None
    if return_cache:
        conv = jnp.concatenate(convs) if convs else cache.conv
        ssm = jnp.concatenate(ssms) if ssms else cache.ssm
        new = new_cache(cache, state, kv_valid, conv, ssm, keys, values, l)
    dt = None
    if capture_dt:
        dt = jnp.concatenate(dts) if dts else jnp.zeros((0, b, l, cfg.channels), f32)
    return h, new, dt
