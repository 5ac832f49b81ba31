"""The fused decode step: the Mamba2 step kernel (`longmamba_kernels.ssd.step`) against
its jnp reference and the Flax mixer's step, and `generate(decode_impl="fused")` against the
default scan decode (same greedy tokens, logits within fp32 rounding).

The kernel runs through the Pallas interpreter here ("pallas-interpret"); the compiled kernel
is checked on the GPU by `evals/bench/model.py` (decode section: tokens and logits vs "scan").
Shapes are awkward on purpose: 6 heads, ngroups 1 / 2 / 3, batch 1 and 3, a layer in the
middle of a stacked cache, the LongMamba filter on some heads, a dt_limit clamp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.mixers import Mamba2Mixer, ScanBackend
from longmamba_jax.model import LayerFilters
from longmamba_kernels.common import RTOL
from longmamba_kernels.ssd.step import ssd_decode_step

f32 = jnp.float32


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf in output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, *, b, h, p, n, G, K=4, L=3, dtype=f32, filtered=True):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), f32)

    E = h * p
    conv_dim = E + 2 * G * n
    zx = r(b, 2 * E + 2 * G * n + h).astype(dtype)
    args = dict(
        zxbcdt=zx, conv_state=r(L, b, K - 1, conv_dim), ssm_state=r(L, b, h, p, n),
        conv_weight=r(K, conv_dim, scale=0.5).astype(dtype), conv_bias=r(conv_dim).astype(dtype),
        dt_bias=r(h).astype(dtype), A=-jnp.exp(r(h)), D=r(h).astype(dtype),
        # even heads global: head 0 with a threshold above every Δ (fully filtered), the
        # others near the median Δ; odd heads local (−inf)
        threshold=jnp.where(jnp.arange(h) % 2 == 0, jnp.where(jnp.arange(h) == 0, 1e9, 0.6),
                            -jnp.inf) if filtered else None,
    )
    return args


SHAPES = {  # name -> (b, h, p, n, G)
    "b1-g1": (1, 6, 16, 16, 1),
    "b3-g2": (3, 6, 16, 32, 2),
    "b2-g3-p32": (2, 6, 32, 16, 3),
}


@pytest.mark.parametrize("dtype", [f32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("filtered", [True, False], ids=["filter", "nofilter"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_kernel_matches_reference(shape, filtered, dtype):
    b, h, p, n, G = SHAPES[shape]
    seed = 10 * list(SHAPES).index(shape) + filtered
    args = _inputs(seed, b=b, h=h, p=p, n=n, G=G, dtype=dtype, filtered=filtered)
    kw = dict(layer=1, ngroups=G, headdim=p, d_state=n, dt_limit=(0.0, 3.0))
    ref = ssd_decode_step(**args, implementation="reference", **kw)
    out = ssd_decode_step(**args, implementation="pallas", interpret=True, **kw)
    for o, r_, what in zip(out, ref, ("g", "conv window", "ssm state"), strict=True):
        assert o.dtype == f32 and o.shape == r_.shape, what
        assert rel_err(o, r_) <= RTOL[jnp.dtype(f32)], f"{what}: {rel_err(o, r_):.2e}"
    # the other layers of the stacked state are left as they were
    np.testing.assert_array_equal(np.asarray(out[2])[[0, 2]], np.asarray(args["ssm_state"])[[0, 2]])
    if filtered:  # Δ := 0 on head 0: its state neither decays nor takes input
        np.testing.assert_array_equal(np.asarray(out[2])[1, :, 0],
                                      np.asarray(args["ssm_state"])[1, :, 0])
        unf = ssd_decode_step(**{**args, "threshold": None}, implementation="reference", **kw)
        assert rel_err(unf[2], ref[2]) > 1e-3


def test_step_kernel_unstacked_and_errors():
    args = _inputs(7, b=2, h=4, p=16, n=16, G=1)
    kw = dict(ngroups=1, headdim=16, d_state=16)
    stacked = ssd_decode_step(**args, layer=2, implementation="reference", **kw)
    flat = dict(args, conv_state=args["conv_state"][2], ssm_state=args["ssm_state"][2])
    out = ssd_decode_step(**flat, implementation="pallas", interpret=True, **kw)
    assert rel_err(out[0], stacked[0]) <= 1e-5 and rel_err(out[2], stacked[2][2]) <= 1e-5
    with pytest.raises(ValueError, match="implementation"):
        ssd_decode_step(**flat, implementation="triton", **kw)
    with pytest.raises(ValueError, match="power-of-two headdim"):
        odd = _inputs(8, b=1, h=4, p=12, n=16, G=1)
        ssd_decode_step(**odd, layer=0, implementation="pallas", interpret=True,
                        ngroups=1, headdim=12, d_state=16)


def test_step_kernel_matches_flax_mixer_step():
    """The kernel + gated norm + out_proj == `Mamba2Mixer(step=True)` on the same weights."""
    cfg = lmj.Mamba2Config.tiny(ngroups=2, d_state=16)
    mixer = Mamba2Mixer(cfg, ScanBackend("reference"), f32)
    rng = np.random.default_rng(0)
    b = 2
    u = jnp.asarray(rng.standard_normal((b, 1, cfg.d_model)), f32)
    conv = jnp.asarray(rng.standard_normal((b, cfg.d_conv - 1, cfg.conv_dim)), f32)
    ssm = jnp.asarray(rng.standard_normal((b, cfg.nheads, cfg.headdim, cfg.d_state)), f32)
    w = mixer.init(jax.random.PRNGKey(1), u, conv_state=conv, ssm_state=ssm, step=True)
    w = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), f32), w)
    ref, aux = mixer.apply(w, u, conv_state=conv, ssm_state=ssm, step=True)
    p = w["params"]
    zx = jnp.einsum("bi,io->bo", u[:, 0], p["in_proj"]["kernel"])
    g, conv_new, ssm_new = ssd_decode_step(
        zx, conv, ssm, p["conv1d"]["kernel"], p["conv1d"]["bias"], p["dt_bias"],
        -jnp.exp(p["A_log"]), p["D"], None, ngroups=cfg.ngroups, headdim=cfg.headdim,
        d_state=cfg.d_state, implementation="pallas", interpret=True)
    y = lmj.layers.rms_norm(g.reshape(b, -1), p["norm"]["weight"], cfg.norm_eps,
                            cfg.d_inner // cfg.ngroups)
    out = y @ p["out_proj"]["kernel"]
    assert rel_err(out, ref[:, 0]) <= 1e-5
    assert rel_err(conv_new, aux.conv_state) <= 1e-6
    assert rel_err(ssm_new, aux.ssm_state) <= 1e-5


# ----------------------------------------------------------------------------------------------
# generate(decode_impl="fused") == generate(decode_impl="scan")


class FixedFilter:
    """A LongMamba-shaped method: every even channel global with one threshold."""

    def __init__(self, theta: float, filter_decode: bool):
        self.theta, self.filter_decode = theta, filter_decode

    def model_kwargs(self, config, seq_len):
        c = config.channels
        glob = jnp.broadcast_to(jnp.arange(c) % 2 == 0, (config.n_layer, c))
        return {"filters": LayerFilters(glob, jnp.full((config.n_layer, c), self.theta, f32))}


MODELS = {
    "mamba2-g1": lambda: lmj.Mamba2Config.tiny(),
    "mamba2-g2": lambda: lmj.Mamba2Config.tiny(ngroups=2, d_state=16),
    "mamba1": lambda: lmj.MambaConfig.tiny(),
}


def _params(config, seed=3):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: lmj.init_params(config)).weights

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "A_log" in name:
            return np.broadcast_to(np.log(np.arange(1, s.shape[-1] + 1)), s.shape)
        if "norm" in name or name.endswith("['D']"):
            return 1.0 + 0.1 * rng.standard_normal(s.shape)
        return 0.3 * rng.standard_normal(s.shape)

    weights = jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(fill(path, s), s.dtype),
                                               shapes)
    return lmj.Params(weights, config)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_generate_matches_scan(name, batch):
    params = _params(MODELS[name]())
    prompts = np.random.default_rng(batch).integers(0, 61, (batch, 9)).astype(np.int32)
    dt = lmj.apply_model(params, jnp.asarray(prompts), capture_dt=True).dt
    method = FixedFilter(float(np.median(np.asarray(dt))), filter_decode=True)
    backends = ["reference"] + (["pallas-interpret"] if name.startswith("mamba2") else [])
    for meth in (None, method):
        kw = dict(max_new_tokens=10, method=meth, return_logits=True)
        ref = lmj.generate(params, prompts, decode_impl="scan", backend="reference", **kw)
        for backend in backends:
            out = lmj.generate(params, prompts, decode_impl="fused", backend=backend, **kw)
            what = f"{name} b={batch} {backend} filter={meth is not None}"
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), what)
            assert rel_err(out.logits, ref.logits) <= 1e-5, what
        if meth is not None:  # the filter is really on in the decode steps
            plain = lmj.generate(params, prompts, decode_impl="fused", backend="reference",
                                 max_new_tokens=10, return_logits=True,
                                 method=FixedFilter(method.theta, filter_decode=False))
            assert rel_err(plain.logits[:, 1:], ref.logits[:, 1:]) > 1e-3


def test_fused_decode_keeps_one_layer_loop_out_and_gemm_rows():
    """The fused loop body has no layer loop, and at batch 1 every projection is a [2, i] dot
    (the padded row that keeps XLA:GPU from rewriting it into multiply + reduce)."""
    from longmamba_jax.generation.generate import _decode_loop
    from longmamba_jax.generation.sampling import Greedy

    params = _params(MODELS["mamba2-g1"]())
    logits0, cache = lmj.prefill(params, np.zeros((1, 5), np.int32), backend="reference")
    texts = {impl: _decode_loop.lower(
        params, cache, logits0, jax.random.PRNGKey(0), None, jnp.zeros((0,), jnp.int32),
        jnp.int32(0), sampler=Greedy(), max_new_tokens=3, backend=ScanBackend("reference"),
        return_logits=False, decode_impl=impl).as_text() for impl in ("scan", "fused")}
    text = texts["fused"]
    assert text.count("stablehlo.while") == texts["scan"].count("stablehlo.while") - 1
    cfg = params.config
    assert text.count(f"tensor<2x{cfg.d_model}xf32>, tensor<{cfg.d_model}x{cfg.in_proj_dim}") \
        == cfg.n_layer
