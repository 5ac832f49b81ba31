"""Calibration on packed streams (`calibrate(..., segment_ids=...)`): every recorded Δ is what
its document gives alone from the later of its start and the window's start; one document is
the plain stream; separating documents changes the calibration; bad ids are refused."""

from __future__ import annotations

import numpy as np
import pytest

from longmamba_jax.calibration import (
    Calibration,
    calibrate,
    layer_A,
    record_deltas,
    window_starts,
)
from longmamba_jax.model_spec import parse_model_spec

# Windows of 16 tokens at 0, 12 and 24 over 40 tokens: window 0 holds documents 0 and 1; window 1
# starts inside document 1 (4 tokens left), holds documents 2 and 3 (as long as the conv, K = 4)
# and the start of document 4; window 2 holds documents 4 and 5. Mamba2's chunks are 8 tokens.
# Every direct run is 4 or 8 tokens long, so the whole comparison compiles two small programs.
LENGTHS = (8, 8, 4, 4, 8, 8)
TRAIN_LEN, WINDOWS = 16, 3
BACKEND = "reference"  # both sides of every comparison run the same (sequential) scan


def _model(arch, seed):
    """The `tiny-random:ARCH` model (byte vocabulary), as the command line loads it."""
    return parse_model_spec(f"tiny-random:{arch}").load(seed=seed)


@pytest.fixture(scope="module", params=["mamba2", "mamba1"])
def packed(request):
    """(params, stream, segment ids) for one architecture."""
    params = _model(request.param, seed=0)
    rng = np.random.default_rng(3)
    stream = rng.integers(0, params.config.vocab_size, sum(LENGTHS))
    ids = np.repeat(np.asarray([4, 9, 2, 5, 4, 1]), LENGTHS)  # any ints: runs are documents
    return params, stream, ids


def _record(params, tokens, **kw):
    kw = {"train_len": TRAIN_LEN, "num_windows": WINDOWS, **kw}
    return np.stack(record_deltas(params, tokens, backend=BACKEND, progress=False, **kw))


def _direct(params, stream):
    """Δ [n_layer, windows, train_len, C] of every window token from its document run alone
    (the plain recording path on one piece), starting at the later of the document's start and
    the window's start."""
    ends = np.cumsum(LENGTHS)
    begins = ends - np.asarray(LENGTHS)
    alone = {}
    out = []
    for s in window_starts(stream.size, TRAIN_LEN, WINDOWS):
        rows = []
        for p in range(s, s + TRAIN_LEN):
            d = int(np.searchsorted(ends, p, side="right"))
            lo, hi = max(s, begins[d]), ends[d]  # the model is causal: the whole rest of the doc
            if (lo, hi) not in alone:
                alone[lo, hi] = _record(params, stream[lo:hi], train_len=hi - lo, num_windows=1)
            rows.append(alone[lo, hi][:, 0, p - lo])
        out.append(np.stack(rows, axis=1))  # [n_layer, train_len, C]
    return np.stack(out, axis=1), alone


def test_packed_windows_record_each_documents_own_delta(packed):
    params, stream, ids = packed
    np.testing.assert_array_equal(window_starts(stream.size, TRAIN_LEN, WINDOWS), [0, 12, 24])
    got = _record(params, stream, segment_ids=ids)
    direct, alone = _direct(params, stream)
    # Window 1 starts inside document 1: its direct run is that document's tail.
    assert sorted(alone) == [(0, 8), (8, 16), (12, 16), (16, 20), (20, 24), (24, 32), (32, 40)]
    np.testing.assert_allclose(got, direct, rtol=1e-6, atol=0)
    # The other forms of the same packing record the same windows (the same program).
    docs = [stream[lo:hi] for lo, hi in zip(np.cumsum((0,) + LENGTHS[:-1]), np.cumsum(LENGTHS),
                                            strict=True)]
    np.testing.assert_array_equal(_record(params, docs), got)
    np.testing.assert_array_equal(_record(params, stream[None], segment_ids=ids[None]), got)
    np.testing.assert_array_equal(
        _record(params, stream, cu_seqlens=np.cumsum((0,) + LENGTHS)), got)
    # calibrate() on the packed stream is the rule applied to those per-document Δ.
    cal = calibrate(params, stream, segment_ids=ids, train_len=TRAIN_LEN, num_windows=WINDOWS,
                    backend=BACKEND, progress=False)
    ref = Calibration.from_deltas(list(direct), layer_A(params), train_len=TRAIN_LEN)
    for a, b in zip(cal.decay_fraction, ref.decay_fraction, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for s in (17, 30, 100):
        for a, b in zip(cal.thresholds(s), ref.thresholds(s), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)


def _same_calibration(a, b):
    for x, y in zip(a.decay_fraction, b.decay_fraction, strict=True):
        np.testing.assert_array_equal(x, y)
    for s in (17, 30, 100):
        for x, y in zip(a.thresholds(s), b.thresholds(s), strict=True):
            np.testing.assert_array_equal(x, y)


def test_one_document_is_the_plain_stream(packed):
    params, stream, _ = packed
    kw = {"train_len": TRAIN_LEN, "num_windows": WINDOWS, "backend": BACKEND, "progress": False}
    plain = calibrate(params, stream, **kw)
    _same_calibration(calibrate(params, stream, segment_ids=np.full(stream.size, 7), **kw),
                      plain)
    _same_calibration(calibrate(params, stream, cu_seqlens=[0, stream.size], **kw), plain)
    _same_calibration(calibrate(params, [stream], **kw), plain)


def test_separated_documents_differ_from_the_unpacked_stream(packed):
    params, stream, ids = packed
    got = _record(params, stream, segment_ids=ids)
    plain = _record(params, stream)
    # Up to each window's first document boundary the two runs see the same tokens from the
    # same (zero) start; after it the packed run restarts and the plain one carries on.
    first_boundary = [8, 4, 8]  # window-relative: 8 - 0, 16 - 12, 32 - 24
    for w, b in enumerate(first_boundary):
        np.testing.assert_allclose(got[:, w, :b], plain[:, w, :b], rtol=1e-6)
        diff = np.abs(got[:, w, b:] - plain[:, w, b:]) / np.abs(plain[:, w, b:])
        assert diff.max() > 1e-2, (w, diff.max())
    kw = {"train_len": TRAIN_LEN, "num_windows": WINDOWS, "backend": BACKEND, "progress": False}
    a = calibrate(params, stream, segment_ids=ids, **kw)
    b = calibrate(params, stream, **kw)
    decay = [np.max(np.abs(x / y - 1)) for x, y in zip(a.decay, b.decay, strict=True)]
    assert max(decay) > 1e-3, decay


def test_bad_packing_is_refused_before_any_work(monkeypatch):
    import longmamba_jax.calibration.record as record

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")

    monkeypatch.setattr(record, "apply_model", no_forward)
    params = _model("mamba2", seed=0)
    n = 40
    stream = np.arange(n) % params.config.vocab_size
    kw = {"train_len": TRAIN_LEN, "num_windows": WINDOWS, "progress": False}
    cases = [
        ({"segment_ids": np.zeros(n - 1, int)},
         r"segment_ids must be int \[1, 40\] like tokens, got int64 \(1, 39\).*one segment id "
         r"per token of the 40-token stream"),
        ({"segment_ids": np.zeros((2, n // 2), int)}, r"segment_ids must be int \[1, 40\]"),
        ({"segment_ids": np.zeros(n, np.float32)}, r"segment_ids must be int .* got float32"),
        ({"segment_ids": np.zeros(n, bool)}, r"segment_ids must be int .* got bool"),
        ({"segment_ids": np.zeros(n, int), "cu_seqlens": [0, n]}, "not both"),
        ({"cu_seqlens": [0, 10, n - 1]}, r"cu_seqlens must be increasing ints from 0 to the "
         r"length 40"),
        ({"cu_seqlens": [0, 10, 10, n]}, "cu_seqlens must be increasing"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            calibrate(params, stream, **kw, **extra)
        with pytest.raises(ValueError, match=message):
            record_deltas(params, stream, **kw, **extra)
    docs = [stream[:20], stream[20:]]
    with pytest.raises(ValueError, match="list of documents or segment_ids / cu_seqlens"):
        calibrate(params, docs, segment_ids=np.zeros(n, int), **kw)
    with pytest.raises(ValueError, match=r"documents\[1\] must be a 1-D token sequence, got "
                                         r"shape \(2, 10\)"):
        calibrate(params, [stream[:20], stream[20:].reshape(2, 10)], **kw)
    with pytest.raises(ValueError, match="the documents are all empty"):
        calibrate(params, [[], []], **kw)
    with pytest.raises(ValueError, match="tokens must be integer token ids"):
        calibrate(params, [stream[:20], stream[20:] + 0.5], **kw)
    with pytest.raises(ValueError, match="fewer than train_len=16"):
        calibrate(params, [stream[:5], stream[5:10]], **kw)


def test_hybrid_models_refuse_packed_streams():
    import jax

    from longmamba_jax.config import tiny_config
    from longmamba_jax.model import init_params

    # zero weights of the right shapes: the refusal comes before any weight is used
    shapes = jax.eval_shape(lambda: init_params(tiny_config("zamba2", vocab_size=257)))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    stream = np.arange(40) % params.config.vocab_size
    with pytest.raises(ValueError, match="packed documents .* are not supported"):
        calibrate(params, stream, segment_ids=np.repeat([0, 1], 20), train_len=TRAIN_LEN,
                  num_windows=WINDOWS, progress=False)


def test_cli_separator_calibrates_the_documents(tmp_path):
    from longmamba_jax.calibration.cli import main
    from longmamba_jax.tokenizer import ByteTokenizer

    parts = ["the first document, " * 3, "a second, shorter one. ", "and a third " * 4]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(parts) + "\n\n")  # a trailing separator: no empty document
    out = tmp_path / "cal.npz"
    args = ["--model", "tiny-random:mamba2", "--text", str(text), "--tokenizer", "bytes",
            "--train-len", str(TRAIN_LEN), "--num-windows", str(WINDOWS), "--backend", BACKEND]
    assert main([*args, "--out", str(out), "--separator", r"\n\n"]) == 0
    docs = [np.asarray(ByteTokenizer().encode(p)) for p in parts]
    want = calibrate(_model("mamba2", seed=0), docs, train_len=TRAIN_LEN, num_windows=WINDOWS,
                     backend=BACKEND, progress=False)
    _same_calibration(Calibration.load(out), want)
    assert main([*args, "--out", str(tmp_path / "x.npz"), "--separator", "\\"]) == 2
