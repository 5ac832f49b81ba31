"""Configs from both checkpoint schemas, and the precision policy."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.config import ConfigError, from_dict
from longmamba_jax.model import apply_model

NATIVE_M2 = {"d_model": 2048, "d_intermediate": 0, "n_layer": 48, "vocab_size": 50277,
             "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
             "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
             "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def test_native_mamba2_defaults_and_padding():
    cfg = from_dict(NATIVE_M2)
    assert isinstance(cfg, lmj.Mamba2Config)
    assert (cfg.d_state, cfg.headdim, cfg.expand, cfg.ngroups, cfg.d_conv, cfg.chunk_size) == \
        (128, 64, 2, 1, 4, 256)
    assert cfg.padded_vocab_size == 50288 and cfg.nheads == 64 and cfg.channels == 64
    assert cfg.dt_limit == (0.0, math.inf) and cfg.tie_embeddings


def test_native_mamba1_defaults():
    cfg = from_dict({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
                     "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                     "pad_vocab_size_multiple": 8})
    assert isinstance(cfg, lmj.MambaConfig)
    assert (cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank) == (16, 4, 2, 48)
    assert cfg.padded_vocab_size == 50280 and cfg.channels == 1536


@pytest.mark.parametrize("change,message", [
    ({"d_intermediate": 4096}, "d_intermediate"),
    ({"attn_layer_idx": [3]}, "attention layers"),
    ({"rms_norm": False}, "rms_norm"),
    ({"ssm_cfg": {"layer": "Mamba2", "rmsnorm": False}}, "rmsnorm"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "norm_before_gate"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 48}}, "headdim"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({"ssm_cfg": {"layer": "Mamba2", "flux": 1}}, "flux"),
    ({"surprise": 1}, "surprise"),
])
def test_native_unsupported_or_invalid_fails_with_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({**NATIVE_M2, **change}, source="ckpt/config.json")


def test_transformers_schema_and_inf_encoding():
    cfg = from_dict({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2,
                     "vocab_size": 100, "state_size": 16, "head_dim": 32, "num_heads": 4,
                     "n_groups": 2, "time_step_limit": [0.0, {"__float__": "Infinity"}],
                     "tie_word_embeddings": False})
    assert cfg.dt_limit == (0.0, math.inf) and cfg.ngroups == 2 and not cfg.tie_embeddings
    assert cfg.padded_vocab_size == 100  # transformers stores the embedding at its final size
    with pytest.raises(ConfigError, match="num_heads=5"):
        from_dict({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2,
                   "vocab_size": 100, "head_dim": 32, "num_heads": 5, "n_groups": 1})
    with pytest.raises(ConfigError, match="model_type='llama'"):
        from_dict({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                   "vocab_size": 10})
    with pytest.raises(ConfigError, match="unknown config schema"):
        from_dict({"hidden": 3})


@pytest.mark.parametrize("cfg", [lmj.Mamba2Config.tiny(), lmj.MambaConfig.tiny(dt_rank=3)])
def test_own_schema_round_trip(cfg):
    back = from_dict(cfg.to_dict())
    assert back == cfg and back.fingerprint == cfg.fingerprint


@pytest.mark.parametrize("cfg", [lmj.Mamba2Config.tiny(ngroups=2, d_state=4, headdim=8),
                                 lmj.MambaConfig.tiny()])
def test_precision_policy_bf16_params(cfg):
    """bf16 parameters; Δ, the SSM/conv state and logits are fp32; no NaN."""
    params = lmj.init_params(cfg, seed=0, dtype=jnp.bfloat16)
    leaves = [leaf.dtype for leaf in __import__("jax").tree.leaves(params.weights)]
    assert set(leaves) == {jnp.dtype(jnp.bfloat16)}
    tokens = np.arange(12)[None] % cfg.vocab_size
    out = apply_model(params, tokens, return_cache=True, capture_dt=True)
    assert out.logits.dtype == jnp.float32
    assert out.dt.dtype == jnp.float32
    assert out.cache.ssm.dtype == jnp.float32 and out.cache.conv.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()


def test_matmul_dtype_rounds_in_the_epilogue_on_gpu(monkeypatch):
    """bf16 matmuls without a bias write bf16 on a GPU (one rounding of the fp32 accumulator, as
    f32-then-cast does) and fp32 elsewhere; fp32 parameters and biased matmuls stay fp32."""
    import jax

    from longmamba_jax import layers

    bf16 = jnp.dtype(jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.bfloat16)
    lin = layers.Linear(32, use_bias=False, param_dtype=jnp.bfloat16)
    params = lin.init(jax.random.PRNGKey(0), x)
    on_cpu = lin.apply(params, x)
    assert layers.matmul_dtype(jnp.bfloat16) == jnp.float32

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.matmul_dtype(jnp.bfloat16) == bf16
    assert layers.matmul_dtype(jnp.float32) == jnp.float32
    dots = [e for e in jax.make_jaxpr(lin.apply)(params, x).jaxpr.eqns
            if e.primitive.name == "dot_general"]
    assert [e.params["preferred_element_type"] for e in dots] == [bf16]
    on_gpu = lin.apply(params, x)
    assert on_gpu.dtype == bf16
    # same rounding of the same fp32 sum; only the summation order may differ (1 ulp)
    np.testing.assert_allclose(np.asarray(on_gpu, np.float32), np.asarray(on_cpu, np.float32),
                               rtol=2**-7, atol=0)
    biased = layers.Linear(32, use_bias=True, param_dtype=jnp.bfloat16)
    dots = [e for e in jax.make_jaxpr(biased.apply)(biased.init(jax.random.PRNGKey(0), x), x)
            .jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [e.params["preferred_element_type"] for e in dots] == [jnp.float32]


def test_an_impossible_conv_width_is_one_error():
    """A converted config edited to d_conv = 2**31 made loading trace 2**31 conv taps (a hang,
    found by the long fuzz run); any width above MAX_D_CONV is refused by name."""
    from longmamba_jax.config import MAX_D_CONV, ConfigError

    for config in (lmj.Mamba2Config, lmj.MambaConfig):
        config.tiny(d_conv=MAX_D_CONV)
        with pytest.raises(ConfigError, match="d_conv must be at most"):
            config.tiny(d_conv=2**31)


def test_zero_head_dim_is_one_error():
    """headdim = 0 in a converted config was a ZeroDivisionError (found by the long fuzz run)."""
    for name in ("headdim", "ngroups", "chunk_size"):
        with pytest.raises(ConfigError, match=f"{name} must be a positive integer"):
            lmj.Mamba2Config.tiny(**{name: 0})


@pytest.mark.parametrize("config", [lmj.MambaConfig, lmj.Mamba2Config], ids=["mamba1", "mamba2"])
def test_sizes_must_be_positive_ints_not_bools(config):
    """Every size field refuses 0, a float and a bool (True is an int to Python) by name."""
    names = ["d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"]
    if config is lmj.Mamba2Config:
        names += ["headdim", "ngroups", "chunk_size"]
    for name in names:
        for bad in (0, 2.0, True):
            with pytest.raises(ConfigError, match=f"{name} must be a positive integer"):
                config.tiny(**{name: bad})
