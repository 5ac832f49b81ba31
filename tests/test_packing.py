"""Packed documents (`segment_ids`): every scan, the conv and the whole model give, for each
document, exactly what the document gives alone; right-padded and ragged batches give each row
what it gives alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longmamba_kernels.causal_conv import causal_conv1d
from longmamba_kernels.common import document_index
from longmamba_kernels.selective_scan import selective_scan
from longmamba_kernels.ssd import ssd

# Document lengths with boundaries at awkward places for chunk 8: a length-1 first document
# (a boundary right after position 0), one shorter than the conv (K = 4), one ending exactly on
# a chunk edge, one crossing chunks, length-1 documents in the middle and at the end.
LENGTHS = (1, 3, 4, 1, 11, 8, 2, 1)


def _ids(lengths, batch=1):
    ids = np.concatenate([np.full(n, 7 * i + 3) for i, n in enumerate(lengths)])  # any ints
    return np.broadcast_to(ids, (batch, len(ids))).copy()


def _bounds(lengths):
    ends = np.cumsum(lengths)
    return list(zip(ends - np.asarray(lengths), ends, strict=True))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_document_index():
    np.testing.assert_array_equal(document_index(jnp.asarray([[5, 5, 2, 2, 2, 5, 9]])),
                                  [[0, 0, 1, 1, 1, 2, 3]])


def _ssd_inputs(length, seed, b=2, h=4, p=8, g=2, n=8):
    r = np.random.default_rng(seed)
    x = r.normal(size=(b, length, h, p)).astype(np.float32)
    dt = r.uniform(0.01, 0.5, size=(b, length, h)).astype(np.float32)
    A = -r.uniform(0.2, 1.5, size=(h,)).astype(np.float32)
    B = r.normal(size=(b, length, g, n)).astype(np.float32)
    C = r.normal(size=(b, length, g, n)).astype(np.float32)
    D = r.normal(size=(h,)).astype(np.float32)
    h0 = r.normal(size=(b, h, p, n)).astype(np.float32)
    return x, dt, A, B, C, D, h0


def _ss_inputs(length, seed, b=2, e=6, n=4):
    r = np.random.default_rng(seed)
    x = r.normal(size=(b, length, e)).astype(np.float32)
    dt = r.uniform(0.01, 0.5, size=(b, length, e)).astype(np.float32)
    A = -r.uniform(0.2, 1.5, size=(e, n)).astype(np.float32)
    B = r.normal(size=(b, length, n)).astype(np.float32)
    C = r.normal(size=(b, length, n)).astype(np.float32)
    D = r.normal(size=(e,)).astype(np.float32)
    h0 = r.normal(size=(b, e, n)).astype(np.float32)
    return x, dt, A, B, C, D, h0


def _alone(fn, arrays, h0, lengths):
    """Each document run alone (the first from h0, the others from zeros): y concatenated, and
    the final state of the last one."""
    ys, state = [], None
    for i, (lo, hi) in enumerate(_bounds(lengths)):
        part = [a[:, lo:hi] for a in arrays]
        y, state = fn(*part, initial_state=h0 if i == 0 else None)
        ys.append(np.asarray(y))
    return np.concatenate(ys, axis=1), np.asarray(state)


@pytest.mark.parametrize("impl", ["reference", "associative"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_packed_equals_documents_alone(impl, with_h0):
    x, dt, A, B, C, D, h0 = _ssd_inputs(sum(LENGTHS), seed=1)
    h0 = h0 if with_h0 else None

    def run(x, dt, B, C, initial_state=None, segment_ids=None):
        return ssd(x, dt, A, B, C, D, chunk_size=8, initial_state=initial_state,
                   segment_ids=segment_ids, implementation=impl)

    y, state = run(x, dt, B, C, h0, _ids(LENGTHS, 2))
    y_alone, state_alone = _alone(run, (x, dt, B, C), h0, LENGTHS)
    assert rel(y, y_alone) < 1e-6 and rel(state, state_alone) < 1e-6


@pytest.mark.parametrize("impl", ["reference", "associative"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_packed_equals_documents_alone(impl, with_h0):
    x, dt, A, B, C, D, h0 = _ss_inputs(sum(LENGTHS), seed=2)
    h0 = h0 if with_h0 else None

    def run(x, dt, B, C, initial_state=None, segment_ids=None):
        return selective_scan(x, dt, A, B, C, D, initial_state=initial_state,
                              segment_ids=segment_ids, implementation=impl)

    y, state = run(x, dt, B, C, h0, _ids(LENGTHS, 2))
    y_alone, state_alone = _alone(run, (x, dt, B, C), h0, LENGTHS)
    assert rel(y, y_alone) < 1e-6 and rel(state, state_alone) < 1e-6


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_packed_equals_documents_alone(with_state):
    r = np.random.default_rng(3)
    length, k, c = sum(LENGTHS), 4, 6
    src = r.normal(size=(2, length, c + 3)).astype(np.float32)
    w = r.normal(size=(k, c)).astype(np.float32)
    bias = r.normal(size=(c,)).astype(np.float32)
    s0 = r.normal(size=(2, k - 1, c)).astype(np.float32) if with_state else None

    def run(src, initial_state=None, segment_ids=None):
        (y,), state = causal_conv1d(src, w, bias, initial_state=initial_state, offset=2,
                                    activation="silu", segment_ids=segment_ids)
        return y, state

    y, state = run(src, s0, _ids(LENGTHS, 2))
    ys, last = [], None
    for i, (lo, hi) in enumerate(_bounds(LENGTHS)):
        yi, last = run(src[:, lo:hi], s0 if i == 0 else None)
        ys.append(np.asarray(yi))
    np.testing.assert_allclose(np.asarray(y), np.concatenate(ys, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state), np.asarray(last), rtol=1e-6, atol=1e-6)


def test_segment_ids_shape_is_checked():
    x, dt, A, B, C, D, _ = _ssd_inputs(5, seed=4)
    with pytest.raises(ValueError, match="segment_ids must be int"):
        ssd(x, dt, A, B, C, D, segment_ids=np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="segment_ids must be int"):
        ssd(x, dt, A, B, C, D, segment_ids=np.zeros((2, 5), np.float32))


def test_single_document_is_bit_identical_to_no_segment_ids():
    x, dt, A, B, C, D, h0 = _ssd_inputs(19, seed=5)
    for impl in ("reference", "associative"):
        a = ssd(x, dt, A, B, C, D, chunk_size=8, initial_state=h0, implementation=impl)
        b = ssd(x, dt, A, B, C, D, chunk_size=8, initial_state=h0, implementation=impl,
                segment_ids=np.zeros((2, 19), np.int32))
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6), a, b)
