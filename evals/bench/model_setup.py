"""The random-weight models the whole-model benchmarks run, with exactly mamba2-1.3b's shapes
(d_model 2048, 48 layers, vocab 50277, d_state 128, headdim 64, expand 2, ngroups 1) and
mamba-1.4b's (Mamba-1, d_state 16), and what a benchmark needs around them: random prompts, a
LongMamba-shaped filter, the model's FLOP and byte costs, memory figures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_jax.model import LayerFilters, apply_model

__all__ = ["CONFIGS", "DTYPES", "SMALL", "FixedFilters", "model_config", "model_costs",
           "peak_bytes", "program_bytes", "random_params", "random_tokens",
           "synthetic_longmamba"]

CONFIGS = {
    # state-spaces/mamba2-1.3b
    "mamba2": lambda: lmj.Mamba2Config(d_model=2048, n_layer=48, vocab_size=50277, d_state=128,
                                       headdim=64, expand=2, ngroups=1),
    # state-spaces/mamba-1.4b
    "mamba1": lambda: lmj.MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, d_state=16,
                                      expand=2),
    # state-spaces/mamba2-130m and mamba-130m: where a 1K-token call is bound by launches
    "mamba2-130m": lambda: lmj.Mamba2Config(d_model=768, n_layer=24, vocab_size=50277,
                                            d_state=128, headdim=64, expand=2, ngroups=1),
    "mamba1-130m": lambda: lmj.MambaConfig(d_model=768, n_layer=24, vocab_size=50277,
                                           d_state=16, expand=2),
}
SMALL = {  # CPU smoke runs
    "mamba2": lambda: lmj.Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16,
                                       headdim=16, expand=2, ngroups=1, chunk_size=32),
    "mamba1": lambda: lmj.MambaConfig(d_model=64, n_layer=2, vocab_size=256, d_state=8,
                                      expand=2),
}
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def model_config(arch: str, small: bool):
    """The config of `arch` (a key of CONFIGS), full size or `small` (the 130m shapes' small
    config is their architecture's)."""
    return SMALL[arch.split("-")[0]]() if small else CONFIGS[arch]()


def random_params(arch: str, small: bool):
    """Random weights of `model_config(arch, small)`: bf16 full size, fp32 small."""
    config = model_config(arch, small)
    dtype = jnp.float32 if small else DTYPES["bf16"]
    params = jax.jit(lambda: lmj.init_params(config, 0, dtype))()
    return jax.block_until_ready(params)


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0):
    """int32 [batch, length] uniform in [0, vocab)."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)),
                       jnp.int32)


def peak_bytes() -> int | None:
    """The device's peak bytes in use so far (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def program_bytes(jitted, *args, **kwargs) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (None if unavailable)."""
    try:
        m = jitted.lower(*args, **kwargs).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - an optional column; some backends have no analysis
        return None


class FixedFilters:
    """A method with the shape of `LongMamba`: the same filter arrays at every length."""

    filter_decode = False

    def __init__(self, filters: LayerFilters):
        self.filters = filters

    def model_kwargs(self, config, seq_len):
        return {"filters": self.filters}


def synthetic_longmamba(params, length: int = 2048) -> FixedFilters:
    """Half the channels global (even indices), θ = each channel's median Δ on a random prompt
    of `length` tokens: a real workload for the filter (a random model's calibration would make
    no channel global: its tA_prod underflows)."""
    tokens = random_tokens(1, length, params.config.vocab_size, seed=7)
    dt = apply_model(params, tokens, capture_dt=True, last_n=1).dt  # [n_layer, 1, l, C]
    theta = jnp.median(dt[:, 0], axis=1)  # [n_layer, C]
    channels = theta.shape[1]
    is_global = jnp.broadcast_to(jnp.arange(channels) % 2 == 0, theta.shape)
    return FixedFilters(LayerFilters(is_global, theta.astype(jnp.float32)))


def model_costs(params) -> dict:
    """FLOPs per prefill token (2 × matmul weights of the layers) and the bytes a decode step
    must move (all weights once, the head included; the cache is added per batch)."""
    w = params.weights
    proj = 0
    for path, a in jax.tree_util.tree_leaves_with_path(w["layers"]):
        if "proj" in jax.tree_util.keystr(path):
            proj += int(np.prod(a.shape[1:])) * a.shape[0]
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))
    cache = lmj.empty_cache(params.config, 1)
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return {"flops_per_token": 2 * proj, "weight_bytes": weight_bytes,
            "cache_bytes_per_seq": cache_bytes}
