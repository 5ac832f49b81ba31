"""Chunked prefill of long prompts (`longmamba_jax.generation.chunked`) and the unrolled decode
step (`longmamba_jax.generation.decode_steps`): both must compute what the one-shot / scan paths do.

Tiny random-weight models on the CPU (fp32; ‖a − b‖ / ‖b‖ ≤ 1e-5). LongMamba runs with a real
`Calibration` of the tiny model (train_len 16) and channel_threshold 0.0, so that its filters
are active, with θ for the total prompt length in every chunk.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.generation.chunked import chunk_plan

RTOL = 1e-5
TRAIN_LEN = 16
TOTAL = 44  # prompt length > TRAIN_LEN; chunks of 16: 16 + 16 + 12 (single) or 8 + 4 (binary)
CHUNK = 16
# The reference scan compiles fastest; the chunking logic does not depend on the backend. CPU
# time here is mostly XLA compiles: the tests share shapes so that they share programs.
BACKEND = "reference"
ARCHS = {
    "mamba2": lambda: lmj.Mamba2Config.tiny(),
    "mamba1": lambda: lmj.MambaConfig.tiny(),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf in output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_close(a, b, what):
    err = rel_err(a, b)
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


def _random_params(config, seed=3):
    """`init_params`' shapes filled on the host (compiling Mamba-1's init takes seconds)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: lmj.init_params(config)).weights

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "A_log" in name:  # A = -(1, 2, …) as in the torch init
            return np.broadcast_to(np.log(np.arange(1, s.shape[-1] + 1)), s.shape)
        if "norm" in name or name.endswith("['D']"):
            return 1.0 + 0.1 * rng.standard_normal(s.shape)
        return 0.3 * rng.standard_normal(s.shape)

    weights = jax.tree_util.tree_map_with_path(
        lambda path, s: jax.numpy.asarray(fill(path, s), s.dtype), shapes)
    return lmj.Params(weights, config)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    config = ARCHS[request.param]()
    params = _random_params(config)
    stream = np.random.default_rng(0).integers(0, config.vocab_size, 400)
    cal = lmj.calibrate(params, stream, train_len=TRAIN_LEN, num_windows=4, backend=BACKEND,
                        progress=False)
    method = lmj.LongMamba(cal, channel_threshold=0.0)
    return params, method


def _tokens(params, batch=2, length=TOTAL, seed=1):
    return np.random.default_rng(seed).integers(0, params.config.vocab_size, (batch, length))


def test_chunk_plan():
    assert chunk_plan(10, 4) == [4, 4, 2]
    assert chunk_plan(8, 4) == [4, 4]
    assert chunk_plan(3, 8) == [3]
    assert chunk_plan(2**20 + 13, 2**16, "binary") == [2**16] * 16 + [8, 4, 1]
    assert sum(chunk_plan(TOTAL, 7, "binary")) == TOTAL
    with pytest.raises(ValueError, match="remainder"):
        chunk_plan(10, 4, "pad")


@pytest.mark.parametrize("use_method", [False, True], ids=["vanilla", "longmamba"])
def test_chunked_matches_one_shot(model, use_method):
    params, longmamba = model
    method = longmamba if use_method else None
    tokens = _tokens(params)
    logits, cache = lmj.prefill(params, tokens, method=method, backend=BACKEND)
    if use_method:  # the filters are on and θ depends on the length: the check has teeth
        filters = longmamba.layer_filters(params.config, TOTAL)
        assert filters is not None and bool(np.asarray(filters.is_global).any())
        assert rel_err(logits, lmj.prefill(params, tokens, backend=BACKEND)[0]) > 1e-3
        theta = np.concatenate(longmamba.calibration.thresholds(TOTAL))
        assert not np.allclose(theta, np.concatenate(longmamba.calibration.thresholds(20)))
    # uneven chunkings: remainder last (16 + 16 + 12), remainder in powers of two (… + 8 + 4)
    for remainder in ("single", "binary") if use_method else ("single",):
        got_logits, got_cache = lmj.prefill_chunked(params, tokens, chunk_size=CHUNK,
                                                    method=method, remainder=remainder,
                                                    backend=BACKEND)
        what = f"chunks of {CHUNK} ({remainder})"
        _assert_close(got_logits, logits, f"{what} logits")
        _assert_close(got_cache.conv, cache.conv, f"{what} conv cache")
        _assert_close(got_cache.ssm, cache.ssm, f"{what} ssm cache")


def test_chunked_uses_total_length_thresholds(model):
    """Each chunk is filtered with θ for the whole prompt, not for the chunk's own length."""
    params, method = model
    tokens = _tokens(params, seed=2)
    got, _ = lmj.prefill_chunked(params, tokens, chunk_size=CHUNK, method=method,
                                 backend=BACKEND)
    # by hand, θ for a shorter length: each chunk's own "length so far" would give other θ
    cache = lmj.empty_cache(params.config, tokens.shape[0])
    for start in range(0, TOTAL, CHUNK):
        part = tokens[:, start : start + CHUNK]
        wrong, cache = lmj.prefill(params, part, cache=cache, method=method, backend=BACKEND,
                                   total_len=TRAIN_LEN + 1 + start)
    assert rel_err(wrong, got) > 1e-4


def test_chunked_validation(model):
    params, _ = model
    tokens = _tokens(params)
    with pytest.raises(ValueError, match="chunk_size"):
        lmj.prefill_chunked(params, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="tokens"):
        lmj.prefill_chunked(params, tokens[0])
    with pytest.raises(ValueError, match="DeciMamba"):
        lmj.prefill_chunked(params, tokens, chunk_size=CHUNK,
                            method=lmj.DeciMamba(layers=(1,), L_base=8), backend=BACKEND)


def test_unrolled_decode_matches_scan(model):
    params, longmamba = model
    filter_decode = params.config.arch == "mamba2"  # filtered steps on one arch, plain on the other
    method = lmj.LongMamba(longmamba.calibration, channel_threshold=0.0,
                           filter_decode=filter_decode)
    prompts = _tokens(params, seed=4)  # TOTAL: the prefill program of the tests above
    kw = dict(max_new_tokens=12, method=method, return_logits=True, backend=BACKEND)
    ref = lmj.generate(params, prompts, decode_impl="scan", **kw)
    out = lmj.generate(params, prompts, decode_impl="unrolled", **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    _assert_close(out.logits, ref.logits, "unrolled vs scan logits")
    with pytest.raises(ValueError, match="decode_impl"):
        lmj.generate(params, prompts, max_new_tokens=2, decode_impl="graph")


def test_unrolled_step_is_straight_line(model):
    """The unrolled loop body holds no inner loop over layers (the point of the variant)."""
    from longmamba_jax.generation.generate import _decode_loop
    from longmamba_jax.generation.sampling import Greedy

    params, _ = model
    logits0, cache = lmj.prefill(params, _tokens(params), backend=BACKEND)
    jnp_ids = jax.numpy.zeros((0,), jax.numpy.int32)
    texts = {}
    for impl in ("scan", "unrolled"):
        texts[impl] = _decode_loop.lower(
            params, cache, logits0, jax.random.PRNGKey(0), None, jnp_ids, jax.numpy.int32(0),
            sampler=Greedy(), max_new_tokens=4, backend=lmj.resolve_backend(BACKEND),
            return_logits=False, decode_impl=impl).as_text()
    # the layer scan is the one loop that goes (the decode loop and any others stay)
    assert texts["unrolled"].count("stablehlo.while") == texts["scan"].count("stablehlo.while") - 1
