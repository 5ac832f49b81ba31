"""Weight-only int8 (`longmamba_jax.quantize`): the per-channel round trip against hand-computed
scales, which weights are quantized, the quantized model against its dequantized float twin
(the int8 matmul path itself, fp32 rounding) and against the original weights (the
quantization error, with a broken scale to show the bound bites), cached decode of every
`decode_impl` against the quantized full forward, LongMamba / DeciMamba / chunked prefill /
hybrid families on quantized weights, jit and pytrees, and the paths that refuse them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.config import tiny_config
from longmamba_jax.model import LayerFilters
from longmamba_jax.quantization import dequantize, is_quantized, quantize_kernel

f32 = jnp.float32
RTOL = 1e-5  # fp32: the int8 path against the same weights dequantized
# The quantization error of the tiny random models' logits (measured 1.9% Mamba-2, 1.8%
# Mamba-1); scales shifted by one output channel give 45% and 61%
# (test_broken_scale_exceeds_bound).
QUANT_BOUND = 0.05
B, L, N = 2, 9, 8


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "NaN/inf in output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


MODELS = {"mamba2": lambda: lmj.Mamba2Config.tiny(), "mamba1": lambda: lmj.MambaConfig.tiny()}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, make in MODELS.items():
        params = jax.jit(lmj.init_params, static_argnums=(0, 1))(make(), 1)
        out[name] = (params, lmj.quantize(params))
    return out


def _tokens(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The round trip and the tree


def test_kernel_round_trip_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 24)).astype(np.float32)  # [layers, in, out]
    w[1, :, 5] = 0.0  # a zero column
    w[2, 7, 3] = 50.0  # an outlier: only its own column's scale grows
    q, scale = (np.asarray(a) for a in quantize_kernel(jnp.asarray(w)))
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (3, 24)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-7)
    assert np.abs(q).max() <= 127 and (np.abs(q).max(axis=1)[scale > 0] == 127).all()
    deq = q.astype(np.float64) * scale[:, None, :]
    bound = scale[:, None, :] / 2 * (1 + 1e-6)
    assert (np.abs(w - deq) <= bound).all()
    assert (q[1, :, 5] == 0).all() and scale[1, 5] == 0
    np.testing.assert_allclose(scale[2, 3], 50 / 127, rtol=1e-7)
    others = np.delete(scale[2], 3)
    assert others.max() < 0.05  # ~max|N(0, 1)| / 127 over 40 rows
    # a hand-computed column: [0.5, -1.27, 0.3] -> scale 0.01, q = [50, -127, 30]
    q1, s1 = quantize_kernel(jnp.asarray([[0.5], [-1.27], [0.3]], f32))
    np.testing.assert_allclose(np.asarray(s1), [0.01], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q1)[:, 0], [50, -127, 30])


@pytest.mark.parametrize("family", ["mamba2", "mamba1", "zamba2", "bamba"])
def test_what_is_quantized(family):
    cfg = tiny_config(family)
    params = jax.jit(lmj.init_params, static_argnums=(0, 1, 2))(cfg, 0, jnp.bfloat16)
    q = lmj.quantize(params)
    assert isinstance(q, lmj.Params) and q.config == params.config
    assert q.dtype == jnp.bfloat16 and is_quantized(q) and not is_quantized(params)
    flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(q.weights)}
    ints = {k for k, a in flat.items() if a.dtype == jnp.int8}
    assert ints == {k for k in flat if k.endswith("['kernel']") and k.replace(
        "['kernel']", "['scale']") in flat}
    for k in ints:  # per output channel: scale [..., out] of the kernel [..., in, out]
        scale = flat[k.replace("['kernel']", "['scale']")]
        assert scale.dtype == f32 and scale.shape == flat[k].shape[:-2] + flat[k].shape[-1:]
    mixer = "['layers']['mixer']"
    assert {f"{mixer}['in_proj']['kernel']", f"{mixer}['out_proj']['kernel']",
            "['lm_head']['kernel']"} <= ints
    assert flat["['lm_head']['kernel']"].shape == (cfg.d_model, cfg.padded_vocab_size)
    # everything the issue keeps in float: A, Δ's parameters, D, the conv, the norms, the
    # embedding (Mamba-1's x_proj and dt_proj too)
    for k, a in flat.items():
        if k not in ints and not k.endswith("['scale']"):
            assert a.dtype == jnp.bfloat16, k
    assert not any(s in k for k in ints for s in ("A_log", "D'", "dt_", "conv1d", "norm",
                                                  "x_proj", "embedding", "adapter"))
    if family == "bamba":
        assert "['attn_layers']['self_attn']['q_proj']['kernel']" in ints
        assert "['layers']['feed_forward']['down_proj']['kernel']" in ints
    if family == "zamba2":
        assert "['shared']['self_attn']['o_proj']['kernel']" in ints
        assert "['linear']['kernel']" in ints
    # the tied embedding stays, the quantized head is a copy of it
    np.testing.assert_array_equal(np.asarray(q.weights["embedding"]["weight"], f32),
                                  np.asarray(params.weights["embedding"]["weight"], f32))
    if cfg.tie_embeddings:
        assert "lm_head" not in params.weights
        head = np.asarray(dequantize(q).weights["lm_head"]["kernel"])
        emb = np.asarray(params.weights["embedding"]["weight"], np.float32).T
        assert np.abs(head - emb).max() <= np.asarray(q.weights["lm_head"]["scale"]).max()


def test_quantize_refuses_bad_input(models):
    params, q = models["mamba2"]
    with pytest.raises(ValueError, match="already quantized"):
        lmj.quantize(q)
    with pytest.raises(ValueError, match="int8 only"):
        lmj.quantize(params, dtype=jnp.int4)
    with pytest.raises(TypeError, match="Params"):
        lmj.quantize(params.weights)


# ----------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_dequantized_and_near_original(models, name):
    params, q = models[name]
    tokens = _tokens(B, 12, params.config.vocab_size, seed=1)
    got = np.asarray(lmj.forward(q, tokens))
    # the int8 path computes exactly the model of the dequantized weights (fp32 rounding)
    assert rel_err(got, lmj.forward(dequantize(q), tokens)) <= RTOL
    err = rel_err(got, lmj.forward(params, tokens))
    assert 1e-4 < err <= QUANT_BOUND, f"{name}: quantized logits rel. err {err:.3e}"


def _roll_scales(q):
    """Every scale shifted by one output channel (a wrong-axis bug)."""
    def walk(node):
        if "scale" in node:
            return {**node, "scale": jnp.roll(node["scale"], 1, axis=-1)}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in node.items()}
    return lmj.Params(walk(q.weights), q.config)


@pytest.mark.parametrize("name", list(MODELS))
def test_broken_scale_exceeds_bound(models, name):
    params, q = models[name]
    tokens = _tokens(B, 12, params.config.vocab_size, seed=1)
    err = rel_err(lmj.forward(_roll_scales(q), tokens), lmj.forward(params, tokens))
    assert err > 6 * QUANT_BOUND, f"{name}: rolled scales only {err:.3e}"


def test_bf16_model_and_astype(models):
    params, _ = models["mamba2"]
    bf = params.astype(jnp.bfloat16)
    q = lmj.quantize(bf)
    tokens = _tokens(B, 12, params.config.vocab_size, seed=2)
    ref = np.asarray(lmj.forward(params, tokens))
    assert rel_err(lmj.forward(q, tokens), ref) <= QUANT_BOUND
    # astype keeps the int8 kernels and their fp32 scales, casts the rest
    q32 = q.astype(f32)
    assert q32.dtype == f32 and q32.weights["layers"]["mixer"]["in_proj"]["kernel"].dtype == \
        jnp.int8 and q32.weights["lm_head"]["scale"].dtype == f32
    assert rel_err(lmj.forward(q32, tokens), lmj.forward(lmj.quantize(bf.astype(f32)),
                                                         tokens)) <= RTOL


# ----------------------------------------------------------------------------------------------
# Cached decode == the quantized forward


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_matches_quantized_forward(models, name):
    _, q = models[name]
    vocab = q.config.vocab_size
    prompts = _tokens(B, L, vocab, seed=3)
    ref = None
    impls = [("scan", "reference"), ("unrolled", "reference"), ("fused", "reference")]
    if name == "mamba2":  # the decode-step Pallas kernel through its interpreter
        impls.append(("fused", "pallas-interpret"))
    for impl, backend in impls:
        out = lmj.generate(q, prompts, max_new_tokens=N, return_logits=True, decode_impl=impl,
                           backend=backend)
        seq = np.concatenate([prompts, np.asarray(out.tokens)[:, :-1]], axis=1)
        full = np.asarray(lmj.forward(q, seq, backend="reference"))[:, L - 1:]
        assert rel_err(out.logits, full) <= RTOL, f"{name} {impl} {backend}"
        if ref is None:
            ref = out
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    # decode_step in a Python loop, and chunked prefill
    tokens = _tokens(B, 14, vocab, seed=4)
    full = np.asarray(lmj.forward(q, tokens))
    logits, cache = lmj.prefill(q, tokens[:, :5])
    assert rel_err(logits, full[:, 4]) <= RTOL
    for t in range(5, 14):
        logits, cache = lmj.decode_step(q, cache, tokens[:, t])
        assert rel_err(logits, full[:, t]) <= RTOL, f"step {t}"
    logits, cache = lmj.prefill_chunked(q, tokens, chunk_size=4)
    one_logits, one_cache = lmj.prefill(q, tokens)
    assert rel_err(logits, one_logits) <= RTOL and rel_err(cache.ssm, one_cache.ssm) <= RTOL


def test_fused_decode_reads_int8_kernels(models):
    """The fused decode loop takes the stacked int8 kernels as they are (no float copy made
    before the loop) and converts each layer's slice inside the loop body."""
    from longmamba_jax.generation.generate import _decode_loop
    from longmamba_jax.generation.sampling import Greedy
    from longmamba_jax.mixers import ScanBackend

    _, q = models["mamba2"]
    cfg = q.config
    logits0, cache = lmj.prefill(q, np.zeros((1, 5), np.int32), backend="reference")
    text = _decode_loop.lower(
        q, cache, logits0, jax.random.PRNGKey(0), None, jnp.zeros((0,), jnp.int32),
        jnp.int32(0), sampler=Greedy(), max_new_tokens=3, backend=ScanBackend("reference"),
        return_logits=False, decode_impl="fused").as_text()
    stacked = f"tensor<{cfg.n_layer}x{cfg.d_model}x{cfg.in_proj_dim}xi8>"
    assert stacked in text and f"tensor<{cfg.n_layer}x{cfg.d_model}x{cfg.in_proj_dim}xf32>" \
        not in text
    # per layer: the padded [2, d] row times the layer's converted int8 kernel
    assert text.count(f"tensor<2x{cfg.d_model}xf32>, tensor<{cfg.d_model}x{cfg.in_proj_dim}"
                      "xf32>") == cfg.n_layer


# ----------------------------------------------------------------------------------------------
# Methods, families, jit


class FixedFilter:
    """A LongMamba-shaped method: even channels global with one threshold."""

    def __init__(self, theta: float, filter_decode: bool = False):
        self.theta, self.filter_decode = theta, filter_decode

    def model_kwargs(self, config, seq_len):
        c = config.channels
        glob = jnp.broadcast_to(jnp.arange(c) % 2 == 0, (config.n_layer, c))
        return {"filters": LayerFilters(glob, jnp.full((config.n_layer, c), self.theta, f32))}


@pytest.mark.parametrize("name", list(MODELS))
def test_methods_on_quantized_weights(models, name):
    _, q = models[name]
    deq = dequantize(q)
    tokens = _tokens(B, 24, q.config.vocab_size, seed=5)
    theta = float(np.median(np.asarray(lmj.apply_model(q, tokens, capture_dt=True).dt)))
    deci = lmj.DeciMamba((1,), L_base=8, min_seq_len=1)
    for method in (FixedFilter(theta), deci):
        got = np.asarray(lmj.forward(q, tokens, method=method))
        assert rel_err(got, lmj.forward(deq, tokens, method=method)) <= RTOL, repr(method)
        assert rel_err(got, lmj.forward(q, tokens)[:, -got.shape[1]:]) > 1e-3  # it acts
    method = FixedFilter(theta, filter_decode=True)
    out = lmj.generate(q, tokens[:, :L], max_new_tokens=N, method=method, return_logits=True)
    seq = np.concatenate([tokens[:, :L], np.asarray(out.tokens)[:, :-1]], axis=1)
    full = np.asarray(lmj.forward(q, seq, method=method))[:, L - 1:]
    assert rel_err(out.logits, full) <= RTOL


@pytest.mark.parametrize("family", ["zamba2", "bamba"])
def test_hybrid_families(family):
    cfg = tiny_config(family)
    params = lmj.init_params(cfg, seed=2)
    q = lmj.quantize(params)
    tokens = _tokens(B, 10, cfg.vocab_size, seed=6)
    got = np.asarray(lmj.forward(q, tokens))
    assert rel_err(got, lmj.forward(dequantize(q), tokens)) <= RTOL
    if family == "bamba":  # 2.6% measured. The tiny random Zamba2 is chaotic: uniform noise
        # of ±scale/2 on its in_proj alone moves its logits by 9-18%, int8 by 24%.
        assert rel_err(got, lmj.forward(params, tokens)) <= QUANT_BOUND
    out = lmj.generate(q, tokens[:, :6], max_new_tokens=5, return_logits=True)
    seq = np.concatenate([tokens[:, :6], np.asarray(out.tokens)[:, :-1]], axis=1)
    assert rel_err(out.logits, np.asarray(lmj.forward(q, seq))[:, 5:]) <= RTOL


def test_pytree_and_jit(models):
    _, q = models["mamba1"]
    leaves, treedef = jax.tree.flatten(q)
    assert any(a.dtype == jnp.int8 for a in leaves)
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, lmj.Params) and back.config == q.config
    tokens = jnp.asarray(_tokens(1, 7, q.config.vocab_size, seed=7))
    jitted = jax.jit(lambda p, t: lmj.apply_model(p, t).logits)(q, tokens)
    assert rel_err(jitted, lmj.forward(q, tokens)) <= RTOL
    mesh = lmj.make_mesh(data=1)
    sharded = lmj.shard(q, mesh)  # the default rules cover the scales
    assert rel_err(lmj.forward(sharded, tokens), lmj.forward(q, tokens)) <= RTOL


def test_demo_passkey_and_calibration():
    """The bundled model, quantized: its LongMamba calibration still applies (the weights it
    identifies are not quantized) and it retrieves a pass key past L_train as before."""
    from longmamba_evals.tasks.text import DEFAULT_TEXT

    demo = lmj.demo_model()
    qdemo = dataclasses.replace(demo, params=lmj.quantize(demo.params))
    text = Path(DEFAULT_TEXT).read_text(encoding="utf-8")
    ids = demo.passkey_prompt("48213", text, n_tokens=2 * demo.train_len, depth=0.5)
    assert qdemo.answer(ids) == demo.answer(ids) == "48213"
    tokens = ids[None, -600:]
    ref = np.asarray(lmj.forward(demo.params, tokens, method=demo.longmamba()))
    got = np.asarray(lmj.forward(qdemo.params, tokens, method=qdemo.longmamba()))
    assert rel_err(got, ref) <= 0.02  # 0.7% measured on text


# ----------------------------------------------------------------------------------------------
# What refuses quantized weights


def test_unsupported_paths_raise(models, tmp_path):
    import optax

    from longmamba_jax.checkpoints.converted import save_converted

    _, q = models["mamba2"]
    with pytest.raises(ValueError, match="export_torch needs the float weights"):
        lmj.export_torch(q, tmp_path / "export")
    with pytest.raises(ValueError, match="saving a converted checkpoint"):
        save_converted(q, tmp_path / "converted", manifest={})
    with pytest.raises(ValueError, match="training needs the float weights"):
        lmj.training.init_train_state(q, optax.adamw(1e-3))
    assert not (tmp_path / "export").exists() and not (tmp_path / "converted").exists()


def test_evals_cli_quantize(tmp_path, small_text):
    """`python -m evals perplexity --quantize int8` runs the quantized model and says so."""
    import json

    from longmamba_evals.tasks.cli import build_parser, run

    common = ["perplexity", "--model", "tiny-random:mamba2", "--tokenizer", "bytes",
              "--lengths", "40", "--windows", "2", "--eval-tokens", "8", "--text", small_text,
              "--no-plot", "--no-progress"]
    res = {}
    for flag in ([], ["--quantize", "int8"]):
        out = tmp_path / (flag[-1] if flag else "float")
        (r,) = run(build_parser().parse_args(common + flag + ["--out", str(out)]))
        res[bool(flag)] = r["curves"]["perplexity"]["y"][0]
        saved = json.loads((out / "perplexity_vanilla.json").read_text())
        assert saved["settings"].get("quantize") == (flag[-1] if flag else None)
    assert res[True] != res[False] and abs(res[True] / res[False] - 1) < 0.05
    with pytest.raises(SystemExit):
        build_parser().parse_args(common + ["--quantize", "int4", "--out", "o"])
