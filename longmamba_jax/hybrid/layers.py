"""Sub-layers of the hybrid families, written on the weights (nested dicts of arrays):
linear, RMSNorm, the MLPs, the attention sub-layer with its KV cache, and the Mamba2 layer.

Precision as in `longmamba_jax.layers` (docs/design.md, "Precision policy"): matmuls in the
parameter dtype with fp32 accumulation, norms, softmax and the residual stream in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from longmamba_jax import layers
from longmamba_jax.hybrid.attention import attention, rope
from longmamba_jax.layers import rms_norm
from longmamba_jax.mixers import Block, Mamba2Mixer, ScanBackend

f32 = jnp.float32


def linear(x, w: dict):
    """x @ kernel (+ bias), rounded once to the kernel dtype (as `layers.Linear`); an int8 kernel
    (`longmamba_jax.quantize`) runs in x's dtype, which is the parameter dtype at every call."""
    scale = w.get("scale")
    return layers.linear(x, w["kernel"], w.get("bias"), scale,
                         dtype=None if scale is None else x.dtype)


def lora(x, w: dict):
    """The low-rank adapter up(down(x)) (torch: Sequential(Linear, Linear), keys 0 and 1)."""
    return linear(linear(x, w["0"]), w["1"])


def norm(x, w: dict, eps: float):
    """RMSNorm of x (any dtype) with weight w["weight"], in the weight's dtype."""
    weight = w["weight"]
    return rms_norm(x.astype(weight.dtype), weight, eps)


def activation(name: str, x):
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=True)
    if name in ("silu", "swish"):
        return x * jax.nn.sigmoid(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unsupported activation {name!r}")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static geometry of an attention sub-layer."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    rotary_dim: int  # 0: no rotary embedding
    rope_theta: float


@dataclasses.dataclass
class KVState:
    """What every attention sub-layer of one forward shares: the query positions, the validity
    of each key slot and, with a cache, where the new keys go."""

    start: Any  # int32 []: the key slot of the first new token
    positions: Any  # int32 [b, l]: rotary positions (each row's real tokens counted)
    kv_valid: Any  # bool [b, S] or None (no padding, no cache)
    cached: bool  # the keys live in a cache buffer of S slots (else S = l, the new keys)
    next_positions: Any  # int32 [b]: positions after this call (for the cache)


def attention_sublayer(x, w: dict, spec: AttentionSpec, state: KVState, kv=None,
                       adapters: dict | None = None):
    """Projections (+ LoRA adapters), rotary embedding, causal attention, output projection.

    x [b, l, D] (parameter dtype); kv: (keys, values) buffers [b, S, K, H] when cached.
    Returns (out [b, l, d_out], (keys, values) after this call: the buffers with the new keys
    written at `state.start`, or the new keys themselves).
    """
    b, l, _ = x.shape
    q, k, v = (linear(x, w[name]) for name in ("q_proj", "k_proj", "v_proj"))
    if adapters is not None:
        q, k, v = (a + lora(x, adapters[name]) for a, name in
                   ((q, "linear_q_adapter"), (k, "linear_k_adapter"), (v, "linear_v_adapter")))
    q = q.reshape(b, l, spec.n_heads, spec.head_dim)
    k = k.reshape(b, l, spec.n_kv_heads, spec.head_dim)
    v = v.reshape(b, l, spec.n_kv_heads, spec.head_dim)
    if spec.rotary_dim:
        q = rope(q, state.positions, spec.rope_theta, spec.rotary_dim)
        k = rope(k, state.positions, spec.rope_theta, spec.rotary_dim)
    if state.cached:
        keys, values = kv
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), state.start, 1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype),
                                                     state.start, 1)
        out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), scale=spec.scale,
                        q_start=state.start, kv_valid=state.kv_valid)
    else:
        keys, values = k, v
        out = attention(q, k, v, scale=spec.scale, kv_valid=state.kv_valid)
    return linear(out.reshape(b, l, spec.n_heads * spec.head_dim), w["o_proj"]), (keys, values)


def kv_state(cache, mask, batch: int, length: int) -> tuple[KVState, Any]:
    """The shared `KVState` of a forward over `length` new tokens, and the kv_valid to store.

    A token's rotary position is the number of real tokens before it in its row (the cache's
    `positions` plus the real tokens of this call), so padding on either side leaves each row's
    positions those it has alone."""
    real = jnp.ones((batch, length), bool) if mask is None else mask > 0
    base = jnp.zeros((batch,), jnp.int32) if cache is None else cache.positions
    counted = jnp.cumsum(real.astype(jnp.int32), axis=1)  # [b, l]
    positions = base[:, None] + jnp.maximum(counted - 1, 0)
    next_positions = base + counted[:, -1]
    if cache is None:
        state = KVState(jnp.int32(0), positions, None if mask is None else real, False,
                        next_positions)
        return state, real
    start = cache.length
    valid = jax.lax.dynamic_update_slice_in_dim(cache.kv_valid, real, start, 1)
    return KVState(start, positions, valid, True, next_positions), valid


def new_cache(cache, state: KVState, kv_valid, conv, ssm, keys: list, values: list, length: int):
    """The `HybridCache` after a forward of `length` tokens: the new Mamba2 states, and the key /
    value buffers of every attention use (stacked; the new keys themselves without a cache)."""
    from longmamba_jax.hybrid.cache import HybridCache

    if keys:
        keys, values = jnp.stack(keys), jnp.stack(values)
    else:  # no attention: keep the (empty) buffers, sized like kv_valid
        shape = cache.keys.shape
        keys = values = jnp.zeros((0, shape[1], kv_valid.shape[1], *shape[3:]), cache.keys.dtype)
    return HybridCache(conv=conv, ssm=ssm, keys=keys, values=values, kv_valid=kv_valid,
                       length=(state.start + length).astype(jnp.int32),
                       positions=state.next_positions)


def mamba_layer(h, x: dict, *, mixer: Mamba2Mixer, eps: float, t=None, mask=None, rule=None,
                capture_dt=False, step=False):
    """h + mamba2(rmsnorm(h + t)) (t: Zamba2's shared-block output, else None).

    x: {"params": {"norm", "mixer", ...}, "conv", "ssm", optional "glob"/"thr" filters}.
    Returns (h, (conv_state, ssm_state, dt)).
    """
    inp = h if t is None else h + t.astype(f32)
    dt_filter = (x["glob"], x["thr"]) if "glob" in x else None
    out, aux = mixer.apply({"params": x["params"]["mixer"]}, norm(inp, x["params"]["norm"], eps),
                           conv_state=x["conv"], ssm_state=x["ssm"], mask=mask,
                           dt_filter=dt_filter, dt_rule=rule, capture_dt=capture_dt,
                           step=step)
    return h + out.astype(f32), (aux.conv_state, aux.ssm_state, aux.dt)


def run_layers(body, h, xs: dict, n: int):
    """Applies body(h, x) to the n stacked layers of xs: one `lax.scan` (n > 1) or one call."""
    if n == 1:
        h, ys = body(h, jax.tree.map(lambda a: a[0], xs))
        return h, jax.tree.map(lambda a: a[None], ys)
    return jax.lax.scan(body, h, xs)


def slice_tree(tree, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], tree)


def layer_inputs(w_layers, cache_conv, cache_ssm, filters, start: int, stop: int) -> dict:
    xs = {"params": slice_tree(w_layers, start, stop), "conv": cache_conv[start:stop],
          "ssm": cache_ssm[start:stop]}
    if filters is not None:
        xs["glob"] = filters.is_global[start:stop]
        xs["thr"] = filters.threshold[start:stop]
    return xs


# ---------------------------------------------------------------------------------------------
# Initialisation (random weights with the torch shapes, for tests and `tiny-random` models).

def init_mamba_layers(mcfg, key, n: int, dtype) -> dict:
    """n stacked Mamba2 layers {"norm", "mixer"} (the `Block` tree of the pure models)."""
    block = Block(mcfg, ScanBackend("reference"), dtype)
    dummy = jnp.zeros((1, 1, mcfg.d_model), dtype)
    return jax.vmap(lambda k: block.init(k, dummy)["params"])(jax.random.split(key, n))


def dense(key, shape, dtype, bias: bool = False) -> dict:
    """{"kernel": [in, out]} (+ zero "bias") with lecun-normal values, stacked over shape[:-2]."""
    w = {"kernel": (jax.random.normal(key, shape) / math.sqrt(shape[-2])).astype(dtype)}
    if bias:
        w["bias"] = jnp.zeros(shape[:-2] + shape[-1:], dtype)
    return w


def ones(shape, dtype) -> dict:
    return {"weight": jnp.ones(shape, dtype)}
