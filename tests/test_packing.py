"""Packed documents (`segment_ids`): every scan, the conv and the whole model give, for each
document, exactly what the document gives alone; right-padded and ragged batches give each row
what it gives alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longmamba_kernels.causal_conv import causal_conv1d
from longmamba_kernels.common import apply_gate, delta_from_projection, document_index
from longmamba_kernels.selective_scan import selective_scan, selective_scan_pallas
from longmamba_kernels.selective_scan.pallas_mosaic import SelectiveScanMosaicConfig
from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig
from longmamba_kernels.selective_scan.reference import selective_scan_reference
from longmamba_kernels.ssd import ssd
from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas
from longmamba_kernels.ssd.reference import ssd_reference

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
# The Pallas kernels, through the interpreter with small blocks (chunks of 16 tokens, several
# segments), against each document run alone through the reference.

# For chunks of 16: a boundary after position 0, inside a chunk, on a chunk edge (16), a document
# spanning two whole chunks (no boundary in [32, 48): the state passes), several boundaries in
# one chunk, documents shorter than the conv (K = 4), length-1 documents, a ragged end.
PALLAS_LENGTHS = (1, 3, 12, 1, 40, 2, 1, 9)

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="compiled Pallas kernels need a CUDA GPU")
GPU = [pytest.mark.gpu, gpu_only]

# 2 segments of 3 chunks at batch 2, the states pass in pieces of 2 chunks (the second piece
# runs past its segment's end into chunks with boundaries it must ignore).
SSD_PACK_CONFIG = SSDPallasConfig(chunk=16, block_p=16, segments=3, min_segment_chunks=1,
                                  state_splits=2)


def _ssd_reference_alone(x, dt, A, B, C, D, h0, lengths):
    run = lambda x, dt, B, C, initial_state=None: ssd_reference(
        x, dt, A, B, C, D, initial_state=initial_state)
    return _alone(run, (x, dt, B, C), h0, lengths)


def _check_ssd_pallas(config, with_h0, lengths=PALLAS_LENGTHS, interpret=True, dtype=np.float32,
                      tol=1e-6, seed=11, b=2, **shape):
    x, dt, A, B, C, D, h0 = _ssd_inputs(sum(lengths), seed=seed, b=b, **shape)
    h0 = h0 if with_h0 else None
    x, B, C = (a.astype(dtype) for a in (x, B, C))
    y, state = ssd_pallas(x, dt, A, B, C, D, initial_state=h0, segment_ids=_ids(lengths, b),
                          interpret=interpret, config=config)
    up = lambda a: np.asarray(a, np.float32)
    y_alone, state_alone = _ssd_reference_alone(up(x), dt, A, up(B), up(C), D, h0, lengths)
    assert rel(y, y_alone) < tol, rel(y, y_alone)
    assert rel(state, state_alone) < tol, rel(state, state_alone)


@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_pallas_packed_equals_documents_alone(with_h0):
    """Segments, the states pass in pieces and the fold, all across document starts."""
    _check_ssd_pallas(SSD_PACK_CONFIG, with_h0, p=16, n=16)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    SSDPallasConfig(chunk=16, block_p=16, segments=1),  # one program walks every chunk
    SSDPallasConfig(chunk=16, block_p=16, segments=2, min_segment_chunks=1, state_splits=1,
                    states_t=False, precompute_cb=True),
], ids=["one_segment", "states_untransposed_precomputed_cb"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_pallas_packed_more_configs(config, with_h0):
    _check_ssd_pallas(config, with_h0, p=16, n=16)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.gpu
@gpu_only
def test_ssd_pallas_packed_gpu(dtype):
    """Compiled, default blocks (chunks of 64; at batch 1 and 47 chunks, 2 segments and the
    states pass), mamba2-like heads, documents of awkward lengths across chunk edges."""
    lengths = (1, 63, 64, 1, 700, 3, 128, 2000, 5)
    dtype = jnp.dtype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    _check_ssd_pallas(SSDPallasConfig(), True, lengths, interpret=False, dtype=dtype, tol=tol,
                      b=1, h=8, p=64, g=1, n=128)


SS_PACK_CONFIGS = {
    # 5 time segments of 14 tokens: the states pass, then the combine over segments with and
    # without a document start
    "lane": SelectiveScanPallasConfig(block_e=8, block_t=2, segments=5),
    "tile": SelectiveScanPallasConfig(layout="tile", block_e=8, block_t=4),
    # blocks of 16 tokens through the Mosaic GPU interpreter, two stages
    "mosaic": SelectiveScanMosaicConfig(block_t=16, unroll=4, stages=2),
}


def _check_ss_pallas(config, with_h0, fused, lengths=PALLAS_LENGTHS, interpret=True,
                     dtype=np.float32, tol=1e-6, seed=12, b=2, e=20, n=4):
    """The packed kernel against each document alone through the reference; `fused`: Δ from the
    raw projection (dt_bias, softplus) and the gate z, as the model calls it."""
    x, dt, A, B, C, D, h0 = _ss_inputs(sum(lengths), seed=seed, b=b, e=e, n=n)
    h0 = h0 if with_h0 else None
    x, B, C = (a.astype(dtype) for a in (x, B, C))
    r = np.random.default_rng(seed + 1)
    kw, bias, z = {}, None, None
    if fused:
        dt = r.normal(size=dt.shape).astype(dtype) - 1.0  # the raw projection
        bias = (0.5 * r.normal(size=(e,))).astype(np.float32)
        z = r.normal(size=(b, sum(lengths), 2 * e + 3)).astype(dtype)
        kw = dict(dt_bias=bias, dt_softplus=True, z=z)
    y, state = selective_scan_pallas(x, dt, A, B, C, D, initial_state=h0,
                                     segment_ids=_ids(lengths, b), interpret=interpret,
                                     config=config, **kw)
    up = lambda a: np.asarray(a, np.float32)
    delta = delta_from_projection(up(dt), bias, fused)
    run = lambda x, dt, B, C, initial_state=None: selective_scan_reference(
        x, dt, A, B, C, D, initial_state=initial_state)
    y_alone, state_alone = _alone(run, (up(x), delta, up(B), up(C)), h0, lengths)
    if fused:
        y_alone = np.asarray(apply_gate(y_alone, up(z)[..., -e:]))
    assert rel(y, y_alone) < tol, rel(y, y_alone)
    assert rel(state, state_alone) < tol, rel(state, state_alone)


@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_pallas_packed_equals_documents_alone(with_h0):
    """The "lane" layout (the Triton default): its states pass and the combine across time
    segments with and without a document start."""
    _check_ss_pallas(SS_PACK_CONFIGS["lane"], with_h0, fused=False)


@pytest.mark.parametrize("layout", ["tile", "mosaic",
                                    pytest.param("lane", marks=pytest.mark.slow)])
def test_selective_scan_pallas_packed_fused(layout):
    """Each kernel as the model calls it (Δ from the raw projection, the gate), with an
    initial state."""
    _check_ss_pallas(SS_PACK_CONFIGS[layout], True, fused=True)


@pytest.mark.parametrize("layout", ["lane", "tile", "mosaic"])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.gpu
@gpu_only
def test_selective_scan_pallas_packed_gpu(layout, dtype):
    """Compiled, default blocks, mamba-1.4b's state size, the model's fused call."""
    config = {"lane": SelectiveScanPallasConfig(), "tile": SelectiveScanPallasConfig(
        layout="tile"), "mosaic": SelectiveScanMosaicConfig()}[layout]
    dtype = jnp.dtype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    _check_ss_pallas(config, True, True, (1, 63, 64, 1, 700, 3, 128, 2000, 5),
                     interpret=False, dtype=dtype, tol=tol, b=1, e=256, n=16)


def _cuda_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


S = jax.ShapeDtypeStruct


def test_ssd_pallas_packed_lowers_for_cuda():
    """With segment_ids the forward (states pass and scan: 2 segments at 4,096 tokens) and the
    three backward kernels lower for CUDA at mamba2-1.3b's head shape, default blocks."""
    b, length, h, p, g, n = 1, 4096, 8, 64, 1, 128
    bf16, f32 = jnp.bfloat16, jnp.float32
    args = (S((b, length, h, p), bf16), S((b, length, h), f32), S((h,), f32),
            S((b, length, g, n), bf16), S((b, length, g, n), bf16), S((h,), f32),
            S((b, h, p, n), f32), S((b, length), jnp.int32))

    def fwd(x, dt, A, B, C, D, s0, seg):
        return ssd_pallas(x, dt, A, B, C, D, initial_state=s0, segment_ids=seg)

    def grad(*a):
        return jax.grad(lambda *a: sum(jnp.sum(o) for o in fwd(*a)), argnums=range(7))(*a)

    text = _cuda_text(fwd, *args)
    assert text.count("custom_call @__gpu") == 2  # states pass + scan, nothing else added
    assert "ssd_segment_states" in text and "ssd_chunk_scan" in text
    text = _cuda_text(grad, *args)
    for name in ("ssd_bwd_states", "ssd_bwd_dx", "ssd_bwd_dbc"):
        assert name in text


@pytest.mark.parametrize("config", [SelectiveScanPallasConfig(),
                                    SelectiveScanPallasConfig(layout="tile"),
                                    SelectiveScanMosaicConfig()], ids=["lane", "tile", "mosaic"])
def test_selective_scan_pallas_packed_lowers_for_cuda(config):
    """With segment_ids each forward kernel (the model's fused call, mamba-1.4b's n = 16, the
    lane layout's two passes) and the three backward kernels lower for CUDA."""
    b, length, e, n = 1, 1000, 256, 16
    bf16, f32 = jnp.bfloat16, jnp.float32
    args = (S((b, length, e), bf16), S((b, length, e), bf16), S((e, n), f32),
            S((b, length, n), bf16), S((b, length, n), bf16), S((e,), f32), S((b, e, n), f32),
            S((e,), f32), S((b, length, 2 * e), bf16), S((b, length), jnp.int32))

    def fwd(x, dt, A, B, C, D, h0, bias, z, seg):
        return selective_scan_pallas(x, dt, A, B, C, D, initial_state=h0, dt_bias=bias,
                                     dt_softplus=True, z=z, out_dtype=bf16, segment_ids=seg,
                                     config=config)

    def grad(*a):
        loss = lambda *a: sum(jnp.sum(o.astype(f32)) for o in fwd(*a))
        return jax.grad(loss, argnums=range(9))(*a)

    text = _cuda_text(fwd, *args)
    if isinstance(config, SelectiveScanMosaicConfig):
        assert "mosaic_gpu" in text
    else:
        names = {"lane": {"selective_scan_states", "selective_scan"}, "tile": {"selective_scan"}}
        for name in names[config.layout]:
            assert f'name = "{name}"' in text
        assert "ex2.approx.ftz.f32" in text and "fma.rn.f32" in text
    text = _cuda_text(grad, *args)
    for name in ("selective_scan_bwd_local", "selective_scan_bwd_fold", "selective_scan_bwd"):
        assert name in text


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
