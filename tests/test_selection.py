"""LongMamba's token-selection rules against a direct numpy transcription of the published code
(GATECH-EIC/LongMamba, `mamba_ssm/ops/selective_scan_interface.py`: get_topk_mask_channelwise,
get_top_k_token_indices, get_channelwise_topAlpha, get_channelwise_offline,
get_channelwise_topBound, get_channelwise_normalize, get_channelwise_dt_threshold), and the rules
inside the model on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.model import LayerFilters, apply_model
from longmamba_jax.selection import RULES, SelectionRule, apply_rule, keep_threshold

# ------------------------------------------------------------------------------------------
# The published semantics, transcribed: delta [b, C, L] (their layout), returns the kept mask
# (or, for "norm", the new Δ) over the global channels only.


def published_mask(kind, d, param, k):
    b, c, length = d.shape
    if kind == "threshold":
        return d > param[None, :, None]
    if kind == "channelwise_topk":
        kk = min(length, k)
        thr = np.quantile(d, 1 - kk / length, axis=2, keepdims=True)  # torch.quantile, linear
        return d > thr
    if kind == "all_topk":
        score = np.linalg.norm(d, axis=1)  # [b, L]
        mask = np.zeros_like(d, dtype=bool)
        for i in range(b):
            top = np.argsort(-score[i], kind="stable")[: min(length, k)]
            mask[i, :, top] = True
        return mask
    order = np.argsort(-d, axis=2, kind="stable")  # torch.sort(descending=True)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(length)[None, None, :], axis=2)
    if kind == "alpha":
        k_values = np.minimum(length * param, length)[None, :, None]
        return ranks < k_values
    if kind == "offline":
        kv = np.minimum(length * param, length).astype(np.int64)
        kv = np.minimum(kv, length - 1)  # torch.gather would fail past the end
        ranked = -np.sort(-d, axis=2)
        thr = np.take_along_axis(ranked, np.broadcast_to(kv[None, :, None], (b, c, 1)), axis=2)
        return d >= thr
    if kind == "bound":
        ranked = -np.sort(-d, axis=2)
        count = (np.cumsum(ranked, axis=2) <= param[None, :, None]).sum(axis=2, keepdims=True)
        return ranks < count
    if kind == "budget":  # ours, not published: the ⌈param⌉ largest
        return ranks < np.ceil(param)[None, :, None]
    raise AssertionError(kind)


def published_dt(kind, d, is_global, param, k):
    """Δ_eff [b, C, L] as the published code leaves it (slow_factor 0)."""
    out = d.copy()
    g = d[:, is_global]
    if kind == "norm":
        total = g.sum(axis=2, keepdims=True)
        out[:, is_global] = g * (param[is_global][None, :, None] / total)
        return out
    mask = published_mask(kind, g, param[is_global], k)
    out[:, is_global] = np.where(mask, g, 0.0)
    return out


def _delta(b, length, c, seed):
    rng = np.random.default_rng(seed)
    return rng.gamma(0.6, 0.05, size=(b, length, c)).astype(np.float32)  # no ties, Δ > 0


def _param(kind, d, rng):
    c = d.shape[2]
    if kind in ("alpha", "offline"):
        return rng.uniform(0.05, 0.6, c).astype(np.float32)
    if kind in ("bound", "norm"):
        return (d.sum(axis=1).mean(axis=0) * rng.uniform(0.1, 0.5, c)).astype(np.float32)
    if kind == "budget":
        return rng.uniform(0.5, 1.5 * d.shape[1], c).astype(np.float32)
    if kind == "threshold":
        return np.quantile(d, 0.7, axis=(0, 1)).astype(np.float32)
    return np.zeros(c, np.float32)


@pytest.mark.parametrize("kind", RULES)
@pytest.mark.parametrize("length", [1, 37, 200])
def test_rule_matches_the_published_code(kind, length):
    rng = np.random.default_rng(length)
    d = _delta(2, length, 6, seed=length)
    is_global = np.array([True, False, True, True, False, True])
    param = _param(kind, d, rng)
    k = 11
    got = np.asarray(apply_rule(jnp.asarray(d), jnp.asarray(is_global), jnp.asarray(param),
                                SelectionRule(kind, k)))
    want = published_dt(kind, d.transpose(0, 2, 1), is_global, param, k).transpose(0, 2, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[..., ~is_global], d[..., ~is_global])  # locals untouched


@pytest.mark.parametrize("kind", ["alpha", "offline", "bound", "channelwise_topk", "budget"])
def test_threshold_form_keeps_exactly_the_published_tokens(kind):
    d = _delta(3, 64, 5, seed=7)
    rng = np.random.default_rng(1)
    param = _param(kind, d, rng)
    t = np.asarray(keep_threshold(jnp.asarray(d), jnp.asarray(param), SelectionRule(kind, 9)))
    mask = published_mask(kind, d.transpose(0, 2, 1), param, 9).transpose(0, 2, 1)
    np.testing.assert_array_equal(d > t[:, None, :], mask)


def test_bound_keeps_the_decay_budget():
    d = _delta(1, 300, 4, seed=3)
    decay = np.array([0.5, 1.0, 2.0, 1e9], np.float32)
    out = np.asarray(apply_rule(jnp.asarray(d), jnp.ones(4, bool), jnp.asarray(decay),
                                SelectionRule("bound")))
    kept = out.sum(axis=1)[0]
    assert np.all(kept <= decay * (1 + 1e-6))
    # adding the next-largest dropped token would exceed the budget
    for c in range(3):
        dropped = d[0, :, c][out[0, :, c] == 0]
        assert kept[c] + dropped.max() > decay[c]
    np.testing.assert_array_equal(out[..., 3], d[..., 3])  # a budget above Σ Δ keeps all


# ------------------------------------------------------------------------------------------
# The thresholds against the sort that defines them: `keep_threshold` finds them by bisection,
# bit for bit the values this sort-based formula gives.

THRESHOLD_RULES = ("channelwise_topk", "alpha", "offline", "bound", "budget")


def _sorted_desc(dt):
    return -jnp.sort(-dt, axis=1)


def _sorted_value_at(v, index):
    length = v.shape[1]
    index = jnp.broadcast_to(index, (v.shape[0], v.shape[2]))
    got = jnp.take_along_axis(v, jnp.clip(index, 0, length - 1)[:, None, :], axis=1)[:, 0]
    return jnp.where(index < length, got, -jnp.inf)


def sorted_keep_threshold(dt, param, rule):
    """The thresholds read off Δ sorted along l (t = v[n], v descending)."""
    length = dt.shape[1]
    if rule.kind == "channelwise_topk":
        q = 1.0 - min(rule.k, length) / length
        pos = q * (length - 1)
        lo, frac = int(pos // 1), pos - int(pos // 1)
        asc = jnp.sort(dt, axis=1)
        hi = min(lo + 1, length - 1)
        return asc[:, lo] + frac * (asc[:, hi] - asc[:, lo])
    v = _sorted_desc(dt)
    if rule.kind == "alpha":
        n = jnp.ceil(jnp.minimum(param * length, length)).astype(jnp.int32)
        return _sorted_value_at(v, n)
    if rule.kind == "budget":
        return _sorted_value_at(v, jnp.ceil(jnp.minimum(param, length)).astype(jnp.int32))
    if rule.kind == "offline":
        j = jnp.minimum(jnp.floor(param * length), length - 1).astype(jnp.int32)
        return jnp.nextafter(_sorted_value_at(v, j), -jnp.inf)
    if rule.kind == "bound":
        n = jnp.sum(jnp.cumsum(v, axis=1) <= param, axis=1)
        return _sorted_value_at(v, n.astype(jnp.int32))
    raise AssertionError(rule.kind)


def _assert_same_bits(got, want, msg=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=msg)


def _tied_delta(kind, b, length, c, seed):
    """Δ with many equal values and zeros (padding): multiples of 1/64 for "bound" (every sum
    exact in fp32, so the bound's cut does not depend on summation order), bf16-rounded and
    clipped values for the others."""
    rng = np.random.default_rng(seed)
    if kind == "bound":
        d = rng.integers(0, 24, size=(b, length, c)) / 64
    else:
        d = rng.gamma(0.6, 0.05, size=(b, length, c))
        d = np.asarray(jnp.asarray(d, jnp.bfloat16).astype(jnp.float32))
        d = np.clip(d, 2.0**-7, 0.1)
    d[:, length - length // 5:, 0] = 0.0  # padded tail in channel 0
    return d.astype(np.float32)


def _edge_params(kind, d):
    """One param per channel, covering keep-nothing, keep-everything, out-of-range and cuts at a
    run of ties."""
    length, c = d.shape[1], d.shape[2]
    rng = np.random.default_rng(5)
    if kind == "alpha":
        base = [0.0, 1.0, 1.7, -0.2, 0.5, 1 / length, 1 - 1 / length]
        base += list(rng.uniform(0, 1, c))
    elif kind == "offline":
        base = [0.0, 1.0, 2.0, -0.5, 0.5, 1 / length, 1 - 1 / length]
        base += list(rng.uniform(0, 1, c))
    elif kind == "budget":
        base = [0.0, length, length + 3, -2.0, 0.5, 1.0, length - 1]
        base += list(rng.uniform(0, length, c))
    elif kind == "bound":
        # decay at an exact prefix sum of the sorted Δ (a cut inside a run of ties), 0, < 0,
        # the total, a little under it, past it
        v = -np.sort(-d[0], axis=0)
        sums = np.cumsum(v, axis=0)
        total = sums[-1]
        base = [0.0, -1.0, total[2], total[3] * (1 - 2**-12), 1e9, sums[length // 2, 5],
                sums[length // 3, 6] + 1 / 128]
        base += list(rng.uniform(0, 1, c) * total)
    else:
        base = [0.0] * c
    return np.asarray(base[:c], np.float32)


@pytest.mark.parametrize("kind", THRESHOLD_RULES)
@pytest.mark.parametrize("length", [1, 2, 300])
def test_thresholds_equal_the_sorted_formula_with_ties(kind, length):
    d = _tied_delta(kind, 2, length, 9, seed=length)
    param = _edge_params(kind, d)
    ks = (1, 2, 5, 37, length - 1, length, length + 10) if kind == "channelwise_topk" else (9,)
    for k in ks:
        if k < 1:
            continue
        rule = SelectionRule(kind, k)
        got = keep_threshold(jnp.asarray(d), jnp.asarray(param), rule)
        want = sorted_keep_threshold(jnp.asarray(d), jnp.asarray(param), rule)
        _assert_same_bits(got, want, f"{kind} k={k} param={param}")


@pytest.mark.parametrize("kind", THRESHOLD_RULES)
def test_thresholds_equal_the_sorted_formula_on_random_delta(kind):
    """Continuous Δ of a wide range (no ties; sums rounded in fp32), and an all-zero row."""
    d = _delta(2, 517, 16, seed=9)
    d[1, :, 3] = 0.0
    param = _param(kind, d, np.random.default_rng(2))
    for k in (1, 100, 400):
        rule = SelectionRule(kind, k)
        got = keep_threshold(jnp.asarray(d), jnp.asarray(param), rule)
        want = sorted_keep_threshold(jnp.asarray(d), jnp.asarray(param), rule)
        _assert_same_bits(got, want, f"{kind} k={k}")


def test_threshold_edges_by_hand():
    d = jnp.asarray(np.array([[[0.5], [0.25], [0.25], [0.0]]], np.float32))  # [1, 4, 1]

    def t(kind, p, k=9):
        return float(keep_threshold(d, jnp.asarray([p], jnp.float32), SelectionRule(kind, k))[0, 0])

    assert t("budget", 0) == 0.5  # keep none: t = max
    assert t("budget", 1) == 0.25 and t("budget", 2) == 0.25  # a tie: both or neither
    assert t("budget", 3) == 0.0 and t("budget", 4) == -np.inf and t("budget", 40) == -np.inf
    assert t("alpha", 0.5) == 0.25 and t("alpha", 1.0) == -np.inf
    assert t("offline", 0.0) == np.nextafter(np.float32(0.5), np.float32(-np.inf))
    assert t("offline", 1.0) == np.nextafter(np.float32(0.0), np.float32(-np.inf))
    assert t("bound", 0.5) == 0.25 and t("bound", 0.75) == 0.25  # 0.5 + 0.25 ≤ 0.75 < 1.0
    assert t("bound", 1.0) == -np.inf and t("bound", 0.4) == 0.5 and t("bound", -1) == 0.5
    assert t("channelwise_topk", 0, k=4) == 0.0  # quantile 0: the minimum
    assert t("channelwise_topk", 0, k=2) == 0.25  # the median of 0, .25, .25, .5
    assert t("channelwise_topk", 0, k=3) == 0.1875  # quantile 1/4: 0 + 0.75 · (0.25 − 0)
    one = jnp.asarray([[[0.3]]], jnp.float32)  # L = 1
    for kind in THRESHOLD_RULES:
        for p in (0.0, 0.5, 1.0, 2.0):
            rule = SelectionRule(kind, 1)
            got = keep_threshold(one, jnp.asarray([p], jnp.float32), rule)
            want = sorted_keep_threshold(one, jnp.asarray([p], jnp.float32), rule)
            _assert_same_bits(got, want, f"L=1 {kind} {p}")


@pytest.mark.parametrize("kind", THRESHOLD_RULES)
def test_thresholds_are_found_without_a_sort(kind):
    d = jnp.asarray(_delta(1, 64, 4, seed=1))
    param = jnp.asarray(_param(kind, np.asarray(d), np.random.default_rng(0)))
    rule = SelectionRule(kind, 9)
    text = jax.jit(keep_threshold, static_argnums=2).lower(d, param, rule).as_text()
    assert "sort" not in text
    assert "while" not in text
    reference = jax.jit(sorted_keep_threshold, static_argnums=2).lower(d, param, rule).as_text()
    assert "sort" in reference  # the check can fail


def test_rule_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown LongMamba rule"):
        SelectionRule("topk")
    with pytest.raises(ValueError, match="positive int"):
        SelectionRule("all_topk", 0)


# ------------------------------------------------------------------------------------------
# Inside the model.

CONFIGS = {
    "mamba2": lambda: lmj.Mamba2Config.tiny(n_layer=2, ngroups=2, d_state=8, headdim=8),
    "mamba1": lambda: lmj.MambaConfig.tiny(n_layer=2),
}


def _calibrated(arch):
    cfg = CONFIGS[arch]()
    params = lmj.init_params(cfg, seed=11)
    stream = np.random.default_rng(0).integers(0, cfg.vocab_size, 400)
    cal = lmj.calibrate(params, stream, train_len=16, num_windows=4, backend="associative",
                        progress=False)
    assert cal.storage == "exact"
    return params, cal


@pytest.mark.parametrize(("arch", "kind"), [("mamba2", "alpha"), ("mamba1", "bound"),
                                             ("mamba2", "channelwise_topk")])
def test_adaptive_rule_in_the_model_is_the_threshold_of_its_own_delta(arch, kind):
    """Every layer of the filtered model keeps exactly the tokens the rule picks from that
    layer's own Δ: the thresholds recomputed in numpy from the captured Δ, given to the model as
    fixed thresholds, give the same logits."""
    params, cal = _calibrated(arch)
    method = lmj.LongMamba(cal, channel_threshold=0.0, rule=kind, k=9)
    tokens = np.random.default_rng(2).integers(0, params.config.vocab_size, (1, 40))
    kwargs = method.model_kwargs(params.config, 40)
    assert kwargs["rule"].kind == kind
    backend = lmj.resolve_backend("reference")
    out = apply_model(params, tokens, capture_dt=True, backend=backend, **kwargs)
    filters = kwargs["filters"]
    glob, param = np.asarray(filters.is_global), np.asarray(filters.threshold)
    dt = np.asarray(out.dt)  # [n_layer, b, l, C], Δ before the rule, under the filtered model
    thr = np.stack([np.where(glob[i], np.asarray(keep_threshold(
        jnp.asarray(dt[i]), jnp.asarray(param[i]), kwargs["rule"]))[0], np.inf)
        for i in range(len(dt))])
    fixed = LayerFilters(jnp.asarray(glob), jnp.asarray(np.where(glob, thr, 0), jnp.float32))
    again = apply_model(params, tokens, filters=fixed, backend=backend)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(again.logits), rtol=1e-6,
                               atol=1e-6)
    vanilla = lmj.forward(params, tokens, backend="reference")
    assert not np.allclose(np.asarray(out.logits), np.asarray(vanilla), atol=1e-5)


def _backends_agree(arch, kind, backends):
    params, cal = _calibrated(arch)
    method = lmj.LongMamba(cal, channel_threshold=0.0, rule=kind, k=7)
    tokens = np.random.default_rng(3).integers(0, params.config.vocab_size, (2, 33))
    ref = np.asarray(lmj.forward(params, tokens, method=method, backend="reference"))
    vanilla = np.asarray(lmj.forward(params, tokens, backend="reference"))
    assert not np.allclose(ref, vanilla, atol=1e-5)
    for backend in backends:
        got = np.asarray(lmj.forward(params, tokens, method=method, backend=backend))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_backends_agree_under_an_adaptive_rule(arch):
    """Every adaptive rule takes the same path in the mixers (the rule applied to Δ in XLA, the
    scan unfiltered), so one rule checks it on every backend; the slow test does them all."""
    _backends_agree(arch, "bound", ("associative", "pallas-interpret"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("kind", [k for k in RULES if k not in ("threshold", "bound")])
def test_backends_agree_under_every_rule(arch, kind):
    _backends_agree(arch, kind, ("associative", "pallas-interpret"))


def test_adaptive_rules_refuse_chunks_and_decode_filtering():
    params, cal = _calibrated("mamba2")
    method = lmj.LongMamba(cal, channel_threshold=0.0, rule="bound")
    tokens = np.random.default_rng(4).integers(0, params.config.vocab_size, (1, 40))
    logits, cache = lmj.prefill(params, tokens, method=method, backend="reference")
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="one call"):
        lmj.prefill_chunked(params, tokens, chunk_size=16, method=method, backend="reference")
    with pytest.raises(ValueError, match="filter_decode"):
        lmj.LongMamba(cal, rule="alpha", filter_decode=True)
    out = lmj.generate(params, tokens, max_new_tokens=3, method=method, backend="reference")
    assert out.shape == (1, 3)


def test_keep_fractions_follow_the_published_alpha():
    """α_S = (k + 1) / S at θ_S's cut, per window, then the window mean (load_align_target.py)."""
    params, cal = _calibrated("mamba2")
    s = 50
    alpha = cal.keep_fractions(s)
    theta = cal.thresholds(s)
    for layer in range(params.config.n_layer):
        assert alpha[layer].shape == (params.config.channels,)
        assert np.all((alpha[layer] > 0) & (alpha[layer] <= 1))
        assert np.all(theta[layer] >= 0)
    # hand check on one window of a one-window calibration: a flat curve
    A = [np.full(3, -1.0)]
    deltas = [np.full((1, 10, 3), 0.1)]
    one = lmj.Calibration.from_deltas(deltas, A, train_len=10)
    # decay = 1.0; resampled to S = 20: twenty values 0.1; cumsum > 1.0 first at index 10
    np.testing.assert_allclose(one.keep_fractions(20)[0], np.full(3, 11 / 20), rtol=1e-6)


def test_budget_keeps_what_alpha_keeps_on_long_prompts():
    """Past a few L, θ_S sits at the clamp value q and the calibration's cut falls in the flat
    top of the resampled curve, so α_S·S = decay/q + 1 for every S: the "budget" rule's count
    decay/q is that limit without storing α (docs/design.md, "LongMamba filtering")."""
    params, cal = _calibrated("mamba2")
    method = lmj.LongMamba(cal, channel_threshold=0.0, rule="budget")
    count = np.asarray(method.layer_filters(params.config, 500).threshold)
    expect = np.stack(cal.decay) / np.stack(cal.clamp_values)
    np.testing.assert_allclose(count, expect, rtol=1e-6)
    one = lmj.Calibration.from_deltas([np.full((1, 10, 3), 0.1)], [np.full(3, -1.0)],
                                      train_len=10)
    for s in (40, 400, 4000):
        np.testing.assert_allclose(one.keep_fractions(s)[0] * s,
                                   one.decay[0] / one.clamp_values[0] + 1, rtol=1e-5)


def test_per_length_host_work_is_done_once(monkeypatch):
    """α_S and a method's filter arrays are solved once per prompt length: a second prefill of
    the same length reads them back (a per-channel solve on the host each call cost the 'alpha'
    and 'offline' rules ten times the prefill itself on a GPU)."""
    from longmamba_jax.calibration import artifact

    params, cal = _calibrated("mamba2")
    calls = []
    solve = artifact.exact_cut_rows
    monkeypatch.setattr(artifact, "exact_cut_rows", lambda *a: calls.append(1) or solve(*a))
    first = cal.keep_fractions(40)
    solved = len(calls)
    assert solved > 0
    second = cal.keep_fractions(40)
    assert len(calls) == solved
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    cal.keep_fractions(41)
    assert len(calls) > solved  # another length is solved for
    method = lmj.LongMamba(cal, rule="alpha", channel_threshold=-1.0)  # every channel global
    filters = method.layer_filters(params.config, 40)
    assert filters is not None
    assert method.layer_filters(params.config, 40) is filters
    assert method.layer_filters(params.config, 48) is not filters
