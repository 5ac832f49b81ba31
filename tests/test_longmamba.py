"""LongMamba inside the model: the filter in every backend, its exact effect on the
state of global channels, when it is off, and calibration matched to its model."""

from __future__ import annotations

import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.calibration import Calibration, calibrate, layer_A, record_deltas
from longmamba_jax.model import LayerFilters, apply_model

CONFIGS = {
    "mamba2": lambda: lmj.Mamba2Config.tiny(n_layer=2, ngroups=2, d_state=8, headdim=8),
    "mamba1": lambda: lmj.MambaConfig.tiny(n_layer=2),
}


def _stream(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


def _cal(params, train_len=16, windows=6):
    stream = _stream(400, params.config.vocab_size)
    return calibrate(params, stream, train_len=train_len, num_windows=windows,
                     backend="associative", progress=False)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_filtered_tokens_leave_global_state_exactly_unchanged(arch):
    cfg = CONFIGS[arch]()
    params = lmj.init_params(cfg, seed=3)
    tokens = _stream(23, cfg.vocab_size, seed=1)[None]
    prefix = apply_model(params, tokens[:, :11], return_cache=True).cache
    # Second chunk: global channels (alternate ones) filter every token (threshold +inf).
    glob = np.zeros((cfg.n_layer, cfg.channels), bool)
    glob[:, ::2] = True
    filters = LayerFilters(glob, np.full(glob.shape, np.inf, np.float32))
    for backend in ("reference", "associative"):
        after = apply_model(params, tokens[:, 11:], cache=prefix, filters=filters,
                            return_cache=True, backend=lmj.resolve_backend(backend)).cache
        before, now = np.asarray(prefix.ssm), np.asarray(after.ssm)
        # ssm: [n_layer, b, C, ...]: global channels bit-identical, local ones moved on.
        np.testing.assert_array_equal(now[:, :, ::2], before[:, :, ::2])
        assert not np.allclose(now[:, :, 1::2], before[:, :, 1::2])


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_backends_agree_with_the_filter_on(arch):
    cfg = CONFIGS[arch]()
    params = lmj.init_params(cfg, seed=4)
    cal = _cal(params)
    method = lmj.LongMamba(cal, channel_threshold=0.0)  # every channel with tA > 0 is global
    tokens = _stream(45, cfg.vocab_size, seed=2)[None]
    assert method.active(45)
    filters = method.layer_filters(cfg, 45)
    assert filters is not None and np.asarray(filters.is_global).any()
    ref = lmj.forward(params, tokens, method=method, backend="reference")
    assoc = lmj.forward(params, tokens, method=method, backend="associative")
    np.testing.assert_allclose(np.asarray(assoc), np.asarray(ref), rtol=1e-5, atol=1e-5)
    vanilla = lmj.forward(params, tokens, backend="reference")
    assert not np.allclose(np.asarray(ref), np.asarray(vanilla), atol=1e-5)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_off_is_bit_identical_to_vanilla(arch):
    cfg = CONFIGS[arch]()
    params = lmj.init_params(cfg, seed=5)
    cal = _cal(params)
    tokens = _stream(30, cfg.vocab_size, seed=3)[None]
    vanilla = np.asarray(lmj.forward(params, tokens, backend="associative"))
    # Every channel local (no tA_prod exceeds 1.0).
    all_local = lmj.LongMamba(cal, channel_threshold=1.0)
    out = lmj.forward(params, tokens, method=all_local, backend="associative")
    np.testing.assert_array_equal(np.asarray(out), vanilla)
    # Prompt not longer than min_len.
    short = lmj.LongMamba(cal, channel_threshold=0.0, min_len=30)
    out = lmj.forward(params, tokens, method=short, backend="associative")
    np.testing.assert_array_equal(np.asarray(out), vanilla)


def test_threshold_is_scale_times_theta_at_the_prompt_length():
    cfg = CONFIGS["mamba2"]()
    params = lmj.init_params(cfg, seed=6)
    cal = _cal(params)
    method = lmj.LongMamba(cal, channel_threshold=0.0, scale=1.5)
    filters = method.layer_filters(cfg, 100)
    expect = np.stack(cal.thresholds(100)) * 1.5
    np.testing.assert_allclose(np.asarray(filters.threshold), expect, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(filters.is_global),
                                  np.stack(cal.global_channels(0.0)))
    with pytest.raises(ValueError, match="min_len"):
        lmj.LongMamba(cal, min_len=5)


def test_recorded_deltas_are_the_models_softplus_dt(tmp_path):
    cfg = CONFIGS["mamba2"]()
    params = lmj.init_params(cfg, seed=7)
    stream = _stream(100, cfg.vocab_size)
    deltas = record_deltas(params, stream, train_len=10, num_windows=3, backend="reference",
                           progress=False)
    assert len(deltas) == cfg.n_layer and deltas[0].shape == (3, 10, cfg.channels)
    starts = np.linspace(0, 90, 3).round().astype(int)
    # The direct run must use the recording's backend. Layer 0's Δ depends only on the
    # embedding, but layer l's Δ is computed from the residual stream after layers < l, whose
    # scan outputs differ in their last fp32 bits between the sequential reference and the
    # chunked associative scan (different summation orders: ~1e-6 relative on Δ, seen as
    # 1.15e-6 on one element of layer 1 with jax 0.10.2). With the same backend both runs
    # execute the same arithmetic in the same order, so the only tolerance left is for XLA
    # fusing the two programs (last_n=1 vs all positions) differently: a few fp32 ulps.
    direct = np.asarray(apply_model(params, np.stack([stream[s:s + 10] for s in starts]),
                                    capture_dt=True, backend=lmj.resolve_backend("reference")).dt)
    np.testing.assert_allclose(np.stack(deltas), direct, rtol=4 * np.finfo(np.float32).eps)
    assert (direct > 0).all()
    # And from_deltas on them is what calibrate() returns (which streams them, 2 + 1 windows).
    cal = Calibration.from_deltas(deltas, layer_A(params), train_len=10,
                                  fingerprint=cfg.fingerprint)
    via = calibrate(params, stream, train_len=10, num_windows=3, backend="reference",
                    batch_size=2, progress=False)
    assert via.fingerprint == cfg.fingerprint and via.storage == cal.storage
    for a, b in zip(cal.decay_fraction, via.decay_fraction, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for s in (11, 15, 40):
        for a, b in zip(cal.thresholds(s), via.thresholds(s), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_calibration_round_trip_and_mismatched_model_refused(tmp_path):
    cfg = CONFIGS["mamba2"]()
    params = lmj.init_params(cfg, seed=8)
    cal = _cal(params)
    path = tmp_path / "cal.npz"
    cal.save(path)
    loaded = lmj.Calibration.load(path)
    for a, b in zip(loaded.thresholds(50), cal.thresholds(50), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = _stream(40, cfg.vocab_size)[None]
    np.testing.assert_array_equal(
        np.asarray(lmj.forward(params, tokens, method=lmj.LongMamba(loaded, channel_threshold=0))),
        np.asarray(lmj.forward(params, tokens, method=lmj.LongMamba(cal, channel_threshold=0))))
    other = lmj.init_params(lmj.Mamba2Config.tiny(n_layer=3, d_state=8, headdim=8))
    with pytest.raises(ValueError, match="does not match the model"):
        lmj.forward(other, tokens, method=lmj.LongMamba(loaded))
    with pytest.raises(ValueError, match="token ids must be in"):
        lmj.forward(params, tokens + cfg.padded_vocab_size)


def test_calibrate_cli(tmp_path):
    from longmamba_jax.calibration.cli import main

    cfg = lmj.Mamba2Config.tiny(n_layer=2, d_state=8, headdim=8, vocab_size=257)
    params = lmj.init_params(cfg, seed=9)
    from longmamba_jax.checkpoints.export import export_torch

    model_dir = tmp_path / "model"
    export_torch(params, model_dir, layout="native")
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 40)
    out = tmp_path / "cal.npz"
    assert main(["--model", str(model_dir), "--text", str(text), "--tokenizer", "bytes",
                 "--train-len", "32", "--num-windows", "4", "--out", str(out),
                 "--backend", "associative"]) == 0
    cal = lmj.Calibration.load(out)
    assert cal.train_len == 32 and cal.n_layers == cfg.n_layer
    assert cal.storage == "exact"  # auto: a small input
    grid = tmp_path / "grid.npz"
    assert main(["--model", str(model_dir), "--text", str(text), "--tokenizer", "bytes",
                 "--train-len", "32", "--num-windows", "4", "--out", str(grid),
                 "--backend", "associative", "--storage", "grid"]) == 0
    assert lmj.Calibration.load(grid).storage == "grid"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_calibrate_storage_option(arch):
    """`calibrate(storage=...)` stores what was asked: each is `from_deltas` with that storage on
    the recorded Δ, and only the exact storage has the kept fractions α (what the alpha and
    offline rules read)."""
    params = lmj.init_params(CONFIGS[arch](), seed=4)
    stream = _stream(400, params.config.vocab_size)
    kw = dict(train_len=16, num_windows=6, backend="reference")
    deltas = record_deltas(params, stream, progress=False, **kw)
    for storage in ("exact", "grid"):
        via = calibrate(params, stream, storage=storage, progress=False, **kw)
        direct = Calibration.from_deltas(deltas, layer_A(params), train_len=16, storage=storage)
        assert via.storage == storage
        for s in (17, 40, 300):
            for a, b in zip(direct.thresholds(s), via.thresholds(s), strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-6)
        if storage == "exact":
            assert len(via.keep_fractions(300)) == params.config.n_layer
        else:
            with pytest.raises(ValueError, match="storage='exact'"):
                via.keep_fractions(300)
    with pytest.raises(ValueError, match="storage"):
        calibrate(params, stream, storage="sorted", progress=False, **kw)
