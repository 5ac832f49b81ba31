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


# ------------------------------------------------------------------------------------------
# The model.

import longmamba_jax as lmj  # noqa: E402
from longmamba_jax.model import apply_model  # noqa: E402

MODELS = {
    "mamba2": lambda: lmj.Mamba2Config.tiny(n_layer=2, ngroups=2, d_state=8, headdim=8),
    "mamba1": lambda: lmj.MambaConfig.tiny(n_layer=2),
}
DOCS = (1, 3, 9, 2, 12)  # with chunk 8: a boundary after position 0, inside and across chunks


def _model(arch, seed=0):
    cfg = MODELS[arch]()
    return lmj.init_params(cfg, seed=seed)


def _tokens(params, n, seed, batch=1):
    return np.random.default_rng(seed).integers(0, params.config.vocab_size, (batch, n))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("backend", ["reference", "associative"])
def test_packed_forward_equals_documents_alone(arch, backend):
    params = _model(arch)
    tokens = _tokens(params, sum(DOCS), seed=1)
    packed = np.asarray(lmj.forward(params, tokens, segment_ids=_ids(DOCS), backend=backend))
    alone = np.concatenate([np.asarray(lmj.forward(params, tokens[:, lo:hi], backend=backend))
                            for lo, hi in _bounds(DOCS)], axis=1)
    assert rel(packed, alone) < 1e-6
    via_cu = lmj.forward(params, tokens, cu_seqlens=np.cumsum((0,) + DOCS), backend=backend)
    np.testing.assert_array_equal(np.asarray(via_cu), packed)


@pytest.mark.parametrize("arch", list(MODELS))
def test_packed_prefill_leaves_the_last_documents_state(arch):
    params = _model(arch, seed=1)
    tokens = _tokens(params, sum(DOCS), seed=2)
    logits, cache = lmj.prefill(params, tokens, segment_ids=_ids(DOCS), backend="associative")
    lo, hi = _bounds(DOCS)[-1]
    logits_alone, cache_alone = lmj.prefill(params, tokens[:, lo:hi], backend="associative")
    assert rel(logits, logits_alone) < 1e-6
    assert rel(cache.ssm, cache_alone.ssm) < 1e-6 and rel(cache.conv, cache_alone.conv) < 1e-6


@pytest.mark.parametrize("arch", list(MODELS))
def test_right_padded_batch_equals_each_row_alone(arch):
    """A ragged batch padded on the right (and one row on the left): each row's last logits and
    cache are its own, and greedy generation continues every row as it would alone."""
    params = _model(arch, seed=2)
    lengths, width = (13, 2, 7), 13
    rows = [_tokens(params, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    tokens = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int32)
    for i, row in enumerate(rows):
        start = width - len(row) if i == 2 else 0  # row 2 left-padded, the others right
        tokens[i, start:start + len(row)] = row
        mask[i, start:start + len(row)] = 1
    logits, cache = lmj.prefill(params, tokens, attention_mask=mask, backend="associative")
    out = np.asarray(lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=5,
                                  backend="associative"))
    for i, row in enumerate(rows):
        l_i, c_i = lmj.prefill(params, row[None], backend="associative")
        assert rel(logits[i], l_i[0]) < 1e-6
        assert rel(cache.ssm[:, i], c_i.ssm[:, 0]) < 1e-6
        assert rel(cache.conv[:, i], c_i.conv[:, 0]) < 1e-6
        alone = np.asarray(lmj.generate(params, row[None], max_new_tokens=5,
                                        backend="associative"))
        np.testing.assert_array_equal(out[i], alone[0])


def test_packed_longmamba_filters_each_document_at_its_own_length():
    params = _model("mamba2", seed=3)
    stream = _tokens(params, 400, seed=4)[0]
    cal = lmj.calibrate(params, stream, train_len=8, num_windows=4, backend="associative",
                        progress=False)
    method = lmj.LongMamba(cal, channel_threshold=0.0)
    docs = (30, 5, 21)  # 5 <= train_len: that one is not filtered
    tokens = _tokens(params, sum(docs), seed=5)
    packed = np.asarray(lmj.forward(params, tokens, segment_ids=_ids(docs), method=method,
                                    backend="associative"))
    alone = np.concatenate([np.asarray(lmj.forward(params, tokens[:, lo:hi], method=method,
                                                   backend="associative"))
                            for lo, hi in _bounds(docs)], axis=1)
    assert rel(packed, alone) < 1e-6
    vanilla = np.asarray(lmj.forward(params, tokens, segment_ids=_ids(docs),
                                     backend="associative"))
    assert not np.allclose(packed, vanilla, atol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_of_a_packed_loss_is_the_sum_of_the_documents(arch):
    params = _model(arch, seed=4)
    tokens = _tokens(params, sum(DOCS), seed=6)
    backend = lmj.resolve_backend("reference")

    def loss(weights, toks, seg=None):
        p = lmj.Params(weights, params.config)
        logits = apply_model(p, toks, segment_ids=seg, backend=backend).logits
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1))

    packed = jax.grad(loss)(params.weights, tokens, jnp.asarray(_ids(DOCS)))
    parts = [jax.grad(loss)(params.weights, tokens[:, lo:hi]) for lo, hi in _bounds(DOCS)]
    summed = jax.tree.map(lambda *g: sum(g), *parts)
    for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(summed), strict=True):
        assert rel(a, b) < 1e-5


def test_packing_arguments_are_checked():
    params = _model("mamba2")
    tokens = _tokens(params, 6, seed=7)
    with pytest.raises(ValueError, match="not both"):
        lmj.forward(params, tokens, segment_ids=np.zeros((1, 6), int), cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        lmj.forward(params, tokens, cu_seqlens=[0, 2, 5])
    with pytest.raises(ValueError, match="segment_ids must be int"):
        lmj.forward(params, tokens, segment_ids=np.zeros((1, 5), int))
    with pytest.raises(ValueError, match="DeciMamba"):
        lmj.forward(params, tokens, segment_ids=np.zeros((1, 6), int),
                    method=lmj.DeciMamba(layers=(0,), L_base=2))
