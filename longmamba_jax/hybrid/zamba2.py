"""Zamba2 (docs/families.md, "Zamba2"): Mamba2 layers with shared transformer blocks.

With e the token embedding (fp32) and, for layer i:
    plain layer ("m"):   h = h + mamba2_i(rmsnorm(h))
    hybrid layer ("h"), use u, block b = u mod num_mem_blocks:
        x = rmsnorm_b([h, e])                                     # 2·d_model wide
        a = o_proj_b(attn(q_b(x) + Δq_u(x), k_b(x) + Δk_u(x), v_b(x) + Δv_u(x)))   # LoRA Δ_u
        y = rmsnorm'_b(a);  t = down_b(act(g) · p), [g, p] = gate_up_b(y) + Δgu_u(y)
        h = h + mamba2_i(rmsnorm(h + linear_u(t)))
    logits = lm_head(rmsnorm(h))
Weights: embedding, layers (stacked Mamba2 layers, as the pure models), shared (stacked
[n_blocks]), adapters and linear (stacked [n_uses]), norm_f, lm_head (untied only). The
Mamba2 layers between two hybrid layers run under one `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.hybrid.config import Zamba2Config
from longmamba_jax.hybrid.layers import (
    AttentionSpec,
    activation,
    attention_sublayer,
    dense,
    init_mamba_layers,
    kv_state,
    layer_inputs,
    linear,
    lora,
    mamba_layer,
    new_cache,
    norm,
    ones,
    run_layers,
)
from longmamba_jax.mixers import Mamba2Mixer

f32 = jnp.float32


def attention_spec(cfg: Zamba2Config) -> AttentionSpec:
    return AttentionSpec(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                         scale=(cfg.head_dim / 2) ** -0.5,
                         rotary_dim=cfg.head_dim if cfg.use_rope else 0,
                         rope_theta=cfg.rope_theta)


def init_zamba2(cfg: Zamba2Config, key, dtype) -> dict:
    """Random weights with transformers' Zamba2 shapes (see the module docstring for the tree)."""
    k = iter(jax.random.split(key, 32))
    d, a, f, r = cfg.d_model, 2 * cfg.d_model, cfg.ffn_dim, cfg.adapter_rank
    nb, nu = cfg.n_blocks, cfg.n_uses
    hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    weights = {
        "embedding": {"weight": (0.02 * jax.random.normal(next(k), (cfg.padded_vocab_size, d)))
                      .astype(dtype)},
        "layers": init_mamba_layers(cfg.mamba, next(k), cfg.n_layer, dtype),
        "norm_f": ones((d,), dtype),
    }
    if nu:
        weights["shared"] = {
            "input_layernorm": ones((nb, a), dtype),
            "self_attn": {"q_proj": dense(next(k), (nb, a, hq), dtype),
                          "k_proj": dense(next(k), (nb, a, hkv), dtype),
                          "v_proj": dense(next(k), (nb, a, hkv), dtype),
                          "o_proj": dense(next(k), (nb, hq, d), dtype)},
            "pre_ff_layernorm": ones((nb, d), dtype),
            "feed_forward": {"gate_up_proj": dense(next(k), (nb, d, 2 * f), dtype, cfg.bias),
                             "down_proj": dense(next(k), (nb, f, d), dtype, cfg.bias)},
        }
        adapters = {"gate_up_proj_adapter": {"0": dense(next(k), (nu, d, r), dtype),
                                             "1": dense(next(k), (nu, r, 2 * f), dtype)}}
        if cfg.attn_adapters:
            for name in ("linear_q_adapter", "linear_k_adapter", "linear_v_adapter"):
                adapters[name] = {"0": dense(next(k), (nu, a, r), dtype),
                                  "1": dense(next(k), (nu, r, a), dtype)}
        weights["adapters"] = adapters
        weights["linear"] = dense(next(k), (nu, d, d), dtype)
    if not cfg.tie_embeddings:
        weights["lm_head"] = {"kernel": (0.02 * jax.random.normal(
            next(k), (d, cfg.padded_vocab_size))).astype(dtype)}
    return weights


def _pick(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def shared_block(cfg: Zamba2Config, w: dict, u: int, h, emb, state, kv):
    """The output t [b, l, d] of use u of its shared block (before `linear_u`), and its keys /
    values."""
    block = _pick(w["shared"], u % cfg.num_mem_blocks)
    adapters = _pick(w["adapters"], u)
    x = norm(jnp.concatenate([h, emb], axis=-1), block["input_layernorm"], cfg.norm_eps)
    a, kv = attention_sublayer(x, block["self_attn"], attention_spec(cfg), state, kv,
                               adapters if cfg.attn_adapters else None)
    y = norm(a, block["pre_ff_layernorm"], cfg.norm_eps)
    ffn = block["feed_forward"]
    gate_up = linear(y, ffn["gate_up_proj"]) + lora(y, adapters["gate_up_proj_adapter"])
    g, p = jnp.split(gate_up, 2, axis=-1)
    t = linear(activation(cfg.hidden_act, g) * p, ffn["down_proj"])
    return linear(t, _pick(w["linear"], u)), kv


def _runs(cfg: Zamba2Config):
    """[(start, stop)] of the layers: each run starts at layer 0 or at a hybrid layer."""
    starts = sorted({0, *cfg.hybrid_layers})
    return list(zip(starts, starts[1:] + [cfg.n_layer], strict=True))


def zamba2_body(params, tokens, *, mask, filters, rule, cache, fresh, backend, return_cache,
                capture_dt, step):
    """(residual stream after the last layer, new `HybridCache` or None, Δ or None); `cache`
    holds the states to start from (`fresh`: zeros and no KV cache). See `apply_hybrid`."""
    cfg: Zamba2Config = params.config
    w, pd = params.weights, params.dtype
    b, l = tokens.shape
    emb = jnp.take(w["embedding"]["weight"], tokens, axis=0).astype(f32)  # [b, l, d]
    mixer = Mamba2Mixer(cfg.mamba, backend, pd)
    state, kv_valid = kv_state(None if fresh else cache, mask, b, l)
    conv0, ssm0 = cache.conv, cache.ssm
    hybrid = {layer: u for u, layer in enumerate(cfg.hybrid_layers)}
    h = emb
    convs, ssms, dts, keys, values = [], [], [], [], []
    for start, stop in _runs(cfg):
        xs = layer_inputs(w["layers"], conv0, ssm0, filters, start, stop)
        t = None
        if start in hybrid:
            u = hybrid[start]
            kv = (cache.keys[u], cache.values[u]) if state.cached else None
            t, (k, v) = shared_block(cfg, w, u, h, emb, state, kv)
            keys.append(k)
            values.append(v)

        def body(h, x):
            return mamba_layer(h, x, mixer=mixer, eps=cfg.norm_eps, mask=mask, rule=rule,
                               capture_dt=capture_dt, step=step)

        def body_t(carry, x):  # t enters the run's first layer only (h + 0 == h exactly)
            h, t = carry
            h, ys = mamba_layer(h, x, mixer=mixer, eps=cfg.norm_eps, t=t, mask=mask, rule=rule,
                                capture_dt=capture_dt, step=step)
            return (h, jnp.zeros_like(t)), ys

        if t is None:
            h, ys = run_layers(body, h, xs, stop - start)
        else:
            (h, _), ys = run_layers(body_t, (h, t.astype(f32)), xs, stop - start)
        convs.append(ys[0])
        ssms.append(ys[1])
        dts.append(ys[2])
    new = None
    if return_cache:
        new = new_cache(cache, state, kv_valid, jnp.concatenate(convs), jnp.concatenate(ssms),
                        keys, values, l)
    return h, new, (jnp.concatenate(dts) if capture_dt else None)
