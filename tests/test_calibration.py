"""Tests for longmamba_jax.calibration: hand-computed cases, an independent
implementation of the published rule, the 1% bound of the grid storage, and the artifact."""

import json
import math
import os

import numpy as np
import pytest

from longmamba_jax.calibration import FORMAT_VERSION, Calibration, CalibrationBuilder

# ----------------------------------------------------------------------------- hand-built case
# Two windows of L = 10 tokens, two channels; clamp_top = 0.2 -> k = 2.
#   channel 0, window 0: [0.5, 3, 1, 0, 2, 0.25, 4, 1, 0.5, 0.75]; top-2 = {4, 3} -> q = 3;
#     clamped sum = 0.5+3+1+0+2+0.25+3+1+0.5+0.75 = 12; sorted y = [3,3,2,1,1,.75,.5,.5,.25,0]
#   channel 0, window 1: ten 1.0 -> q = 1, decay = 10, y = all ones
#   channel 1: all zeros -> decay 0
W0 = [0.5, 3.0, 1.0, 0.0, 2.0, 0.25, 4.0, 1.0, 0.5, 0.75]


def _hand_deltas():
    d = np.zeros((2, 10, 2), np.float32)
    d[0, :, 0] = W0
    d[1, :, 0] = 1.0
    return d


A_HAND = np.array([-0.1, -0.5])

# θ by hand, channel 0 window 0 (y above, decay 12):
#   S = 20: r = 1/2, p_i = i/2 - 1/4 (p_0 clamped to 0) -> v = 3, 3, 3, 2.75, 2.25, 1.75, ...
#           cumsum 3, 6, 9, 11.75, 14 -> first > 12 at k = 4 -> θ = v[5] = 1.75
#   S = 11: r = 10/11, p_i = (20 i - 1) / 22 -> v = 3, 3, 3 - 17/22, 2 - 15/22, 1, 0.875,
#           0.75 - (9/22) * 0.25, 0.5 ...; cumsum ... 11.4205, 12.0682 -> k = 6 -> θ = v[7] = 0.5
#   S = 40: r = 1/4, the first six outputs read 3 -> cumsum 3, 6, 9, 12, 15 -> k = 4 -> θ = 3
# window 1 (all ones, decay 10): cumsum j + 1 > 10 first at j = 10, θ = v[11] = 1 for S >= 12;
#   for S = 11, k + 1 = 11 = S -> the last value, 1.
# channel 1 (zeros): the cumsum never exceeds 0 -> θ = v[1] = 0.
HAND_THETA_W0 = {11: 0.5, 20: 1.75, 40: 3.0}


@pytest.mark.parametrize("storage", ["exact", "grid"])
def test_hand_built_mean(storage):
    cal = Calibration.from_deltas(
        [_hand_deltas()], [A_HAND], train_len=10, clamp_top=0.2, storage=storage
    )
    assert cal.storage == storage
    assert cal.header["clamp_k"] == 2
    np.testing.assert_allclose(cal.decay[0], [(12 + 10) / 2, 0.0], rtol=1e-6)
    tA = (math.exp(-0.1 * 12) + math.exp(-0.1 * 10)) / 2
    np.testing.assert_allclose(cal.decay_fraction[0], [tA, 1.0], rtol=1e-6)
    assert cal.decay_fraction[0].dtype == np.float32
    np.testing.assert_array_equal(cal.global_channels(0.34)[0], [False, True])  # tA = 0.3346
    np.testing.assert_array_equal(cal.global_channels(0.33)[0], [True, True])
    for s, w0 in HAND_THETA_W0.items():
        got = cal.thresholds(s)[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, [(w0 + 1.0) / 2, 0.0], rtol=1e-3, err_msg=f"S={s}")
    np.testing.assert_allclose(cal.thresholds(1_000_000)[0], [(3 + 1) / 2, 0.0], rtol=1e-6)


def test_hand_built_max():
    cal = Calibration.from_deltas(
        [_hand_deltas()], [A_HAND], train_len=10, clamp_top=0.2, aggregate="max"
    )
    np.testing.assert_allclose(cal.decay[0], [12.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(cal.decay_fraction[0], [math.exp(-1.0), 1.0], rtol=1e-6)
    for s, w0 in HAND_THETA_W0.items():
        np.testing.assert_allclose(cal.thresholds(s)[0], [max(w0, 1.0), 0.0], rtol=1e-6)


def test_mamba1_state_reduction():
    # A[c, n] per state; window decays for channel 0 are 12 and 10 (see above).
    a1 = np.array([[-0.1, -2.0, -0.3], [-1.0, -1.0, -1.0]])
    d = _hand_deltas()
    cal = Calibration.from_deltas([d], [a1], train_len=10, clamp_top=0.2)
    assert cal.header["architecture"] == "mamba1"
    assert cal.header["slowest_state"] == "max"
    slow = (math.exp(-0.1 * 12) + math.exp(-0.1 * 10)) / 2  # slowest state: max_n A = -0.1
    np.testing.assert_allclose(cal.decay_fraction[0], [slow, 1.0], rtol=1e-6)
    cal = Calibration.from_deltas([d], [a1], train_len=10, clamp_top=0.2, slowest_state="mean")
    mean = np.mean([np.exp(a1[0] * 12).mean(), np.exp(a1[0] * 10).mean()])
    np.testing.assert_allclose(cal.decay_fraction[0], [mean, 1.0], rtol=1e-6)
    # θ does not depend on A
    np.testing.assert_allclose(cal.thresholds(20)[0], [(1.75 + 1) / 2, 0.0], rtol=1e-6)


# ------------------------------------------------------------------ independent implementation
def reference_theta(deltas, train_len, clamp_top, s, aggregate="mean"):
    """The published rule written out per window and channel with an explicit resample.

    deltas: [windows, L, channels]. Returns [channels] float64.
    """
    windows, length, channels = deltas.shape
    k = max(1, int(clamp_top * length))
    out = np.zeros((windows, channels))
    scale = length / s
    src = []  # (i0, i1, lambda) per output, torch upsample_linear1d, align_corners=False
    idx = np.arange(s)
    real = scale * (idx + 0.5) - 0.5
    real[real < 0] = 0.0
    i0 = real.astype(np.int64)
    i0[i0 > length - 1] = length - 1
    lam1 = np.minimum(np.maximum(real - i0, 0.0), 1.0)
    i1 = i0 + (i0 < length - 1)
    src = (i0, i1, 1.0 - lam1, lam1)
    for w in range(windows):
        for c in range(channels):
            x = deltas[w, :, c].astype(np.float64)
            q = np.sort(x)[::-1][k - 1]
            x = np.minimum(x, q)
            total = x.sum()
            srt = np.sort(x)[::-1]
            v = src[2] * srt[src[0]] + src[3] * srt[src[1]]
            cum = np.cumsum(v)
            above = np.nonzero(cum > total)[0]
            kk = int(above[0]) if len(above) else 0  # torch argmax of all-False
            out[w, c] = v[min(kk + 1, s - 1)]
    return out.mean(0) if aggregate == "mean" else out.max(0)


def _realistic(rng, windows, length, channels):
    """Heavy-tailed log-normal-ish Δ, rounded to bfloat16-like precision (ties), with zeros."""
    mu = rng.normal(-3.0, 1.0, size=channels)
    x = np.exp(mu + 1.2 * rng.standard_normal((windows, length, channels)))
    x = x * (1.0 + 4.0 * (rng.random(x.shape) < 0.01))  # bursts
    m, e = np.frexp(x)
    x = np.ldexp(np.round(m * 256) / 256, e)  # 8 mantissa bits -> many ties
    x[rng.random(x.shape) < 0.02] = 0.0
    return x.astype(np.float32)


PUBLISHED = [3000, 4000, 8000, 16000, 32000]
L_TRAIN = 2000


@pytest.fixture(scope="module")
def realistic():
    rng = np.random.default_rng(7)
    deltas = [_realistic(rng, 24, L_TRAIN, 3), _realistic(rng, 24, L_TRAIN, 2)]
    A = [-np.exp(rng.normal(size=3)), -np.exp(rng.normal(size=2))]
    exact = Calibration.from_deltas(deltas, A, train_len=L_TRAIN, storage="exact")
    grid = Calibration.from_deltas(deltas, A, train_len=L_TRAIN, storage="grid")
    return deltas, exact, grid


def _lengths_between():
    near = list(range(2001, 2013))
    mid = np.unique(np.geomspace(2013, 40000, 40).astype(int)).tolist()
    return near + mid + [2999, 3001, 4001, 7999, 15999, 32001, 100_003, 2_097_152]


def test_published_lengths_match_reference(realistic):
    deltas, exact, grid = realistic
    for s in PUBLISHED:
        for layer, d in enumerate(deltas):
            ref = reference_theta(d, L_TRAIN, 0.10, s)
            np.testing.assert_allclose(exact.thresholds(s)[layer], ref, rtol=1e-6)
            # published lengths are anchors of the grid: only the code rounding (5e-4) remains
            np.testing.assert_allclose(grid.thresholds(s)[layer], ref, rtol=2e-3)


def test_any_length_within_one_percent(realistic):
    deltas, exact, grid = realistic
    worst = 0.0
    for s in _lengths_between():
        for layer, d in enumerate(deltas):
            ref = reference_theta(d, L_TRAIN, 0.10, s)
            np.testing.assert_allclose(exact.thresholds(s)[layer], ref, rtol=1e-6)
            rel = np.abs(grid.thresholds(s)[layer] - ref) / ref
            worst = max(worst, float(rel.max()))
    assert worst < 0.01, worst


def test_theta_non_decreasing_in_length(realistic):
    # A longer sequence keeps a smaller share of its tokens: θ moves up the sorted curve.
    _, exact, grid = realistic
    lengths = list(range(2001, 2040)) + np.unique(np.geomspace(2040, 3e6, 200).astype(int)).tolist()
    for cal in (exact, grid):
        th = np.stack([np.concatenate(cal.thresholds(s)) for s in lengths])
        assert np.all(np.diff(th, axis=0) >= -1e-6 * th[1:]), cal.storage
        assert np.all(th[-1] == np.concatenate(cal.thresholds(10**9)))  # constant at the top


def test_aggregate_max_matches_reference():
    rng = np.random.default_rng(3)
    d = _realistic(rng, 5, 300, 4)
    A = [-np.ones(4)]
    cal = Calibration.from_deltas([d], A, train_len=300, clamp_top=0.15, aggregate="max")
    for s in (301, 450, 1000, 4321):
        ref = reference_theta(d, 300, 0.15, s, aggregate="max")
        np.testing.assert_allclose(cal.thresholds(s)[0], ref, rtol=1e-6)


def test_thresholds_refuse_short_lengths(realistic):
    _, exact, _ = realistic
    with pytest.raises(ValueError, match="seq_len=2000 must exceed train_len=2000"):
        exact.thresholds(2000)
    with pytest.raises(ValueError, match="seq_len"):
        exact.thresholds(3000.5)


# ------------------------------------------------------------------------------ the artifact
@pytest.mark.parametrize("storage", ["exact", "grid"])
def test_save_load_round_trip(tmp_path, realistic, storage):
    deltas, exact, grid = realistic
    cal = exact if storage == "exact" else grid
    path = tmp_path / "cal.npz"
    cal.save(path)
    back = Calibration.load(path, expect={"n_layers": 2, "channels": [3, 2]})
    assert back.header == cal.header
    assert set(back._arrays) == set(cal._arrays)
    for name, arr in cal._arrays.items():
        np.testing.assert_array_equal(back._arrays[name], arr, err_msg=name)
        assert back._arrays[name].dtype == arr.dtype
    for s in (2001, 2500, 3000, 12345, 2_097_152):
        for a, b in zip(cal.thresholds(s), back.thresholds(s), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob(".calibration-*"))  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's private mode


def test_header_and_mismatch_refusal(tmp_path):
    cal = Calibration.from_deltas(
        [_hand_deltas(), _hand_deltas()],
        [A_HAND, A_HAND],
        train_len=10,
        clamp_top=0.2,
        fingerprint="mamba2-tiny-abc123",
        model_info={"model_id": "tiny"},
    )
    h = cal.header
    assert h["format_version"] == FORMAT_VERSION
    assert (h["n_layers"], h["channels"], h["train_len"]) == (2, [2, 2], 10)
    assert (h["aggregate"], h["clamp_top"], h["num_windows"]) == ("mean", 0.2, 2)
    assert h["architecture"] == "mamba2" and h["model_info"] == {"model_id": "tiny"}
    path = tmp_path / "c.npz"
    cal.save(path)
    cal.check_compatible("mamba2-tiny-abc123", 2, [2, 2])
    with pytest.raises(ValueError, match="fingerprint"):
        Calibration.load(path, expect={"fingerprint": "other"})
    with pytest.raises(ValueError, match="n_layers 2 != model's 3"):
        Calibration.load(path, expect={"n_layers": 3})
    with pytest.raises(ValueError, match="channels"):
        cal.check_compatible("mamba2-tiny-abc123", 2, [2, 4])
    with pytest.raises(ValueError, match="unknown keys"):
        Calibration.load(path, expect={"n_layer": 2})
    # an unknown format version is refused
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    header["format_version"] = FORMAT_VERSION + 1
    bad = tmp_path / "bad.npz"
    np.savez(bad, header=np.asarray(json.dumps(header)), **arrays)
    with pytest.raises(ValueError, match="unsupported format_version"):
        Calibration.load(bad)
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    d = _hand_deltas()
    kw = dict(train_len=10)
    with pytest.raises(ValueError, match="empty"):
        Calibration.from_deltas([], [], **kw)
    with pytest.raises(ValueError, match="train_len=12"):
        Calibration.from_deltas([d], [A_HAND], train_len=12)
    with pytest.raises(ValueError, match=r"deltas\[0\] must be \[windows"):
        Calibration.from_deltas([d[0]], [A_HAND], **kw)
    with pytest.raises(ValueError, match=r"A\[0\]"):
        Calibration.from_deltas([d], [np.ones(3)], **kw)
    with pytest.raises(ValueError, match="len\\(A\\)=2"):
        Calibration.from_deltas([d], [A_HAND, A_HAND], **kw)
    with pytest.raises(ValueError, match="windows"):
        Calibration.from_deltas([d, d[:1]], [A_HAND, A_HAND], **kw)
    with pytest.raises(ValueError, match=">= 0"):
        Calibration.from_deltas([-d - 1], [A_HAND], **kw)
    with pytest.raises(ValueError, match="aggregate"):
        Calibration.from_deltas([d], [A_HAND], aggregate="avg", **kw)
    with pytest.raises(ValueError, match="clamp_top"):
        Calibration.from_deltas([d], [A_HAND], clamp_top=1.5, **kw)
    with pytest.raises(ValueError, match="slowest_state"):
        Calibration.from_deltas([d], [A_HAND], slowest_state="min", **kw)
    with pytest.raises(ValueError, match="deltas must be a list"):
        Calibration.from_deltas(d, [A_HAND], **kw)  # [w, l, c] without the layer axis
    with pytest.raises(ValueError, match="deltas must be a list"):
        Calibration.from_deltas({"0": d}, [A_HAND], **kw)


def test_stacked_arrays_are_split_by_layer():
    d = _hand_deltas()
    a = Calibration.from_deltas(np.stack([d, d]), np.stack([A_HAND, A_HAND]), train_len=10)
    b = Calibration.from_deltas([d, d], [A_HAND, A_HAND], train_len=10)
    assert a.n_layers == 2
    for s in (11, 20):
        for x, y in zip(a.thresholds(s), b.thresholds(s), strict=True):
            np.testing.assert_array_equal(x, y)


def test_auto_storage_keeps_few_window_calibrations_exact():
    """Beyond 2**22 values, few windows still store the exact curves (the grid cannot follow
    their staircase θ(S) within 1%), many windows use the grid."""
    rng = np.random.default_rng(11)
    L, C = 2000, 1100  # 2 windows x 1100 x 2000 = 4.4M values > 2**22
    few = [np.exp(rng.normal(-3, 1.5, (2, L, C))).astype(np.float32)]
    A = [-np.exp(rng.normal(-2, 1, C)).astype(np.float32)]
    cal = Calibration.from_deltas(few, A, train_len=L)
    assert cal.storage == "exact"
    many = [np.exp(rng.normal(-3, 1.5, (8, L, 300))).astype(np.float32)]  # 4.8M values
    cal = Calibration.from_deltas(many, [A[0][:300]], train_len=L)
    assert cal.storage == "grid"


# ------------------------------------------------------------------------ streamed building
@pytest.mark.parametrize("storage", ["exact", "grid"])
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_builder_in_batches_equals_from_deltas(realistic, storage, aggregate):
    deltas, _, _ = realistic
    rng = np.random.default_rng(3)
    A = [-np.exp(rng.normal(size=(3, 4))), -np.exp(rng.normal(size=(2, 4)))]  # Mamba-1 style
    whole = Calibration.from_deltas(deltas, A, train_len=L_TRAIN, storage=storage,
                                    aggregate=aggregate)
    b = CalibrationBuilder(A, train_len=L_TRAIN, num_windows=24, storage=storage,
                           aggregate=aggregate)
    for lo, hi in [(0, 5), (5, 10), (10, 11), (11, 24)]:
        b.add([d[lo:hi] for d in deltas])
    streamed = b.finish()
    assert streamed.storage == storage and streamed.header["num_windows"] == 24
    for x, y in zip(whole.decay_fraction + whole.decay, streamed.decay_fraction + streamed.decay,
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)  # float32 storage of float64 sums
    # exact: the same curves; grid: the same θ up to summation order, i.e. at most one uint16
    # code step (relative 1e-3) where the rounding of -log(θ/θ_asym) flips.
    rtol = 1e-12 if storage == "exact" else 1.001e-3
    for s in _lengths_between():
        for x, y in zip(whole.thresholds(s), streamed.thresholds(s), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


def test_builder_refuses_wrong_window_counts_and_layers():
    d = _hand_deltas()
    b = CalibrationBuilder([A_HAND], train_len=10, num_windows=3)
    b.add([d])
    with pytest.raises(ValueError, match="more than num_windows=3"):
        b.add([d])
    with pytest.raises(ValueError, match="2 windows added, expected num_windows=3"):
        b.finish()
    with pytest.raises(ValueError, match="for 2 layers, the model has 1"):
        b.add([d[:1], d[:1]])
    b.add([d[:1]])
    assert b.finish().header["num_windows"] == 3
    with pytest.raises(ValueError, match="already finished"):
        b.add([d[:1]])
    with pytest.raises(ValueError, match="num_windows"):
        CalibrationBuilder([A_HAND], train_len=10, num_windows=0)
