"""Hybrid families (Mamba2 layers + attention): Zamba2 and Bamba (docs/families.md).

`longmamba_jax.model` hands a hybrid config here: `apply_hybrid` (the whole model, the same
options as `apply_model`), `init_hybrid` and `empty_hybrid_cache`. Their Mamba2 layers are the
pure models' mixer and LongMamba filters them; attention is left as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.hybrid.cache import HybridCache, empty_hybrid_cache, reserve
from longmamba_jax.hybrid.config import (
    HYBRID_CONFIGS,
    BambaConfig,
    HybridConfig,
    Zamba2Config,
)
from longmamba_jax.mixers import row_ends

__all__ = ["BambaConfig", "HYBRID_CONFIGS", "HybridCache", "HybridConfig", "Zamba2Config",
           "apply_hybrid", "empty_hybrid_cache", "init_hybrid", "is_hybrid", "reserve"]


def is_hybrid(config) -> bool:
    return isinstance(config, (Zamba2Config, BambaConfig))


def _family(config):
    if isinstance(config, Zamba2Config):
        from longmamba_jax.hybrid import zamba2

        return zamba2.init_zamba2, zamba2.zamba2_body
    from longmamba_jax.hybrid import bamba

    return bamba.init_bamba, bamba.bamba_body


def init_hybrid(config: HybridConfig, seed: int = 0, dtype=jnp.float32):
    """Random weights with the torch model's parameter shapes, as `Params`."""
    from longmamba_jax.model import Params

    init, _ = _family(config)
    return Params(init(config, jax.random.PRNGKey(seed), dtype), config)


def apply_hybrid(params, tokens, *, mask=None, filters=None, cache=None, backend, decimation=(),
                 last_n=None, return_cache=False, capture_dt=False, step=False, rule=None,
                 segment_ids=None):
    """`longmamba_jax.model.apply_model` for a hybrid model (called inside its jit)."""
    from longmamba_jax.model import ModelOutput, lm_head

    cfg = params.config
    if decimation:
        raise ValueError(f"DeciMamba is not supported on {cfg.family} (its decimation would "
                         "drop tokens from the attention layers' context too)")
    if cache is not None and not isinstance(cache, HybridCache):
        raise TypeError(f"a {cfg.family} model needs a HybridCache (from prefill or "
                        f"empty_cache), got {type(cache).__name__}")
    if segment_ids is not None:
        raise ValueError(f"packed documents (segment_ids) are not supported on {cfg.family}: "
                         "its attention would see across documents")
    if step and cache is None:
        raise ValueError("a decode step needs a cache")
    fresh = cache is None
    if fresh:
        cache = empty_hybrid_cache(cfg, tokens.shape[0], 0, params.dtype)
    _, body = _family(cfg)
    h, new, dt = body(params, tokens, mask=mask, filters=filters, rule=rule, cache=cache,
                      fresh=fresh, backend=backend, return_cache=return_cache,
                      capture_dt=capture_dt, step=step)
    if last_n == 1 and mask is not None:  # each row's last real token (right padding)
        h = jnp.take_along_axis(h, (row_ends(mask) - 1)[:, None, None], axis=1)
    elif last_n is not None:
        h = h[:, -last_n:]
    return ModelOutput(logits=lm_head(params, h), cache=new, positions=None, dt=dt)
