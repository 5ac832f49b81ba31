"""The decoding state of a hybrid model: the Mamba2 layers' states plus a KV cache.

    conv:     [n_ssm_layer, b, d_conv − 1, conv_dim] fp32   (as `Cache`)
    ssm:      [n_ssm_layer, b, nheads, headdim, d_state] fp32
    keys:     [n_kv, b, S, n_kv_heads, head_dim]   one per attention use, parameter dtype
    values:   same
    kv_valid: bool [b, S]   slot s holds a real token (False: padding or not yet written)
    length:   int32 []      slots written (where the next token's keys go)
    positions: int32 [b]    real tokens of each row so far (the next token's rotary position:
                            padding takes no position, so a padded row matches the row alone)

S is the capacity. A prompt writes its keys at `length` … `length + l − 1`; the caller keeps
`length + l <= S` (`reserve` grows the buffers on the host before a call that would not fit).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from longmamba_jax.model import Cache

f32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["conv", "ssm", "keys", "values", "kv_valid", "length",
                                "positions"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HybridCache(Cache):
    """`Cache` of a hybrid model: the Mamba2 states plus the KV cache (module docstring)."""

    keys: jax.Array
    values: jax.Array
    kv_valid: jax.Array
    length: jax.Array
    positions: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def empty_hybrid_cache(config, batch: int, capacity: int = 0, kv_dtype=f32) -> HybridCache:
    """Zero states and an empty KV cache of `capacity` slots."""
    m = config.mamba
    n = config.n_ssm_layer
    kv = jnp.zeros((config.n_kv_caches, batch, capacity, config.n_kv_heads, config.head_dim),
                   kv_dtype)
    return HybridCache(
        conv=jnp.zeros((n, batch, m.d_conv - 1, m.conv_dim), f32),
        ssm=jnp.zeros((n, batch, m.nheads, m.headdim, m.d_state), f32),
        keys=kv, values=kv, kv_valid=jnp.zeros((batch, capacity), bool),
        length=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch,), jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("capacity", "dtype"))
def _grow(cache: HybridCache, capacity: int, dtype) -> HybridCache:
    extra = capacity - cache.capacity

    def pad(a):
        return jnp.pad(a.astype(dtype), ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))

    return dataclasses.replace(cache, keys=pad(cache.keys), values=pad(cache.values),
                               kv_valid=jnp.pad(cache.kv_valid, ((0, 0), (0, extra))))


def reserve(cache, extra: int, *, total: int | None = None, dtype=None, double: bool = False):
    """A cache with room for `extra` more tokens (a plain `Cache` is returned as it is).

    Reads `length` (one device-to-host copy). When the buffers are too small they are padded
    to `max(length + extra, total)` slots, or at least doubled with `double` (decode steps in a
    user's loop: few distinct capacities, hence few compilations). `dtype` casts the keys and
    values (the model's parameter dtype).
    """
    if not isinstance(cache, HybridCache):
        return cache
    need = int(cache.length) + int(extra)
    dtype = jnp.dtype(dtype or cache.keys.dtype)
    if cache.capacity >= need and cache.keys.dtype == dtype:
        return cache
    capacity = max(need, cache.capacity, int(total or 0))
    if double and capacity < 2 * cache.capacity:
        capacity = 2 * cache.capacity
    return _grow(cache, capacity, dtype)
