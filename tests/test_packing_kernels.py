"""Packed documents (`segment_ids`) on the Pallas backend: the causal-conv kernel and the whole
model (both architectures: fused conv, SSD or selective scan, gated RMSNorm), forward and
gradients, give for each document what the document gives alone through the jnp reference.
Through the interpreter here; the `gpu`-marked versions run the compiled kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.model import apply_model
from longmamba_kernels.causal_conv import causal_conv1d

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="compiled Pallas kernels need a CUDA GPU")


def _ids(lengths, batch=1):
    ids = np.concatenate([np.full(n, 5 * i + 2) for i, n in enumerate(lengths)])  # any ints
    return np.broadcast_to(ids, (batch, len(ids))).astype(np.int32)


def _bounds(lengths):
    ends = np.cumsum(lengths)
    return list(zip(ends - np.asarray(lengths), ends, strict=True))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ------------------------------------------------------------------------------ causal conv
# For blocks of 16 tokens (K = 4): a length-1 first document, documents shorter than the
# window, a boundary exactly on a block edge (16), a document spanning whole blocks, length-1
# documents in the middle and at the end, 69 tokens (not a multiple of the block).
CONV_LENGTHS = (1, 3, 12, 1, 40, 2, 1, 9)


def _conv_inputs(seed, b=1, k=4, c=48, width=72):
    r = np.random.default_rng(seed)
    src = r.normal(size=(b, sum(CONV_LENGTHS), width)).astype(np.float32)
    w = r.normal(size=(k, c)).astype(np.float32)
    bias = r.normal(size=(c,)).astype(np.float32)
    s0 = r.normal(size=(b, k - 1, c)).astype(np.float32)
    return src, w, bias, s0


def _conv(impl, src, w, bias, s0, seg=None, interpret=True):
    # channels 8 … 56 of src, written as outputs of 16 and 32 channels (as Mamba2's x | B, C)
    return causal_conv1d(src, w, bias, initial_state=s0, offset=8, splits=(16, 32),
                         activation="silu", segment_ids=seg, implementation=impl,
                         interpret=interpret, block_t=16)


def _conv_alone(src, w, bias, s0):
    """The reference on each document alone (the first from s0): outputs concatenated, the last
    document's state."""
    ys, state = [], None
    for i, (lo, hi) in enumerate(_bounds(CONV_LENGTHS)):
        y, state = _conv("reference", src[:, lo:hi], w, bias, s0 if i == 0 else None)
        ys.append(jnp.concatenate(y, axis=-1))
    return jnp.concatenate(ys, axis=1), state


def test_conv_pallas_packed_equals_documents_alone():
    """The outputs, the final state, and every gradient (src, weight, bias, initial state) of a
    loss on both equal those of the documents run alone (the gradients summed over them)."""
    args = _conv_inputs(seed=1)
    seg = _ids(CONV_LENGTHS, args[0].shape[0])

    def packed(*a):
        ys, state = _conv("pallas", *a, seg)
        return jnp.concatenate(ys, axis=-1), state

    @functools.partial(jax.jit, static_argnums=2)
    def with_grads(args, ct, fn):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    r = np.random.default_rng(3)
    ct = (r.normal(size=(*args[0].shape[:2], 48)).astype(np.float32),
          r.normal(size=args[3].shape).astype(np.float32))
    (y, state), grads = with_grads(args, ct, packed)
    (y_alone, state_alone), grads_alone = with_grads(args, ct, _conv_alone)
    assert rel(y, y_alone) < 1e-6
    np.testing.assert_array_equal(np.asarray(state), np.asarray(state_alone))
    for name, got, want in zip(("src", "weight", "bias", "initial_state"), grads, grads_alone,
                               strict=True):
        assert rel(got, want) < 1e-6, name


# ------------------------------------------------------------------------------------ model
MODELS = {
    "mamba2": lambda: lmj.Mamba2Config.tiny(n_layer=2, ngroups=2, d_state=8, headdim=8),
    "mamba1": lambda: lmj.MambaConfig.tiny(n_layer=2),
}
# The Pallas SSD kernel runs chunks of 64 (the model's kernels use their default blocks): a
# length-1 first document, a boundary exactly on the chunk edge (64) with a length-1 document
# there, boundaries inside chunks, a length-1 last document, 100 tokens (not a multiple of 64).
DOCS = (1, 63, 1, 22, 12, 1)


def _tokens(cfg, n, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, n))


def _as_batch(tokens, docs):
    """The documents as a right-padded batch [documents, longest] and its mask: row i, cut to
    its own length, is document i alone (the model is causal; the mask only makes each row's
    cache the one after its last real token)."""
    rows = np.zeros((len(docs), max(docs)), tokens.dtype)
    mask = np.zeros(rows.shape, np.int32)
    for i, (lo, hi) in enumerate(_bounds(docs)):
        rows[i, :hi - lo], mask[i, :hi - lo] = tokens[0, lo:hi], 1
    return rows, mask


def _check_model_forward(arch, cfg, docs, backend, tol, seed=0):
    """Packed logits and cache through `backend` against each document alone through the
    reference. The SSM state gets 10·tol for Mamba2: the SSD kernel weights each token's
    contribution by exp2 of a difference of in-chunk cumulative sums of Δ·A·log2(e), each
    rounded in fp32, which at the model's decays (A = −1 … −h) is ~1e-5 relative, packed or
    not (one document alone through the same kernel differs from the reference as much)."""
    params = lmj.init_params(cfg, seed=seed)
    tokens = _tokens(cfg, sum(docs), seed + 1)
    out = apply_model(params, tokens, backend=lmj.resolve_backend(backend),
                      segment_ids=jnp.asarray(_ids(docs)), return_cache=True)
    rows, mask = _as_batch(tokens, docs)
    ref = apply_model(params, rows, mask=jnp.asarray(mask),
                      backend=lmj.resolve_backend("reference"), return_cache=True)
    alone = np.concatenate([np.asarray(ref.logits[i, :n]) for i, n in enumerate(docs)])
    assert rel(out.logits[0], alone) < tol, arch
    # the cache is the last document's state (conv window and SSM state)
    assert rel(out.cache.conv[:, 0], ref.cache.conv[:, -1]) < tol, arch
    state_tol = 10 * tol if arch == "mamba2" else tol
    assert rel(out.cache.ssm[:, 0], ref.cache.ssm[:, -1]) < state_tol, arch


@pytest.mark.parametrize("arch", list(MODELS))
def test_model_pallas_packed_equals_documents_alone(arch):
    _check_model_forward(arch, MODELS[arch](), DOCS, "pallas-interpret", 1e-5)


def _check_model_gradients(cfg, docs, backend, tol, seed=4):
    """The gradient of a packed loss (every position's log-partition) with respect to every
    weight equals the sum of the documents' gradients, each alone through the reference."""
    params = lmj.init_params(cfg, seed=seed)
    tokens = _tokens(cfg, sum(docs), seed + 1)
    rows, mask = _as_batch(tokens, docs)

    def loss(weights, toks, backend, seg=None, keep=None):
        logits = apply_model(lmj.Params(weights, cfg), toks, segment_ids=seg,
                             backend=lmj.resolve_backend(backend)).logits
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(lse if keep is None else lse * keep)

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    packed = grad(params.weights, tokens, backend, jnp.asarray(_ids(docs)))
    summed = grad(params.weights, rows, "reference", None, jnp.asarray(mask, jnp.float32))
    leaves = jax.tree_util.tree_leaves_with_path(packed)
    for (path, a), b in zip(leaves, jax.tree.leaves(summed), strict=True):
        assert rel(a, b) < tol, jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_model_pallas_packed_gradients_are_the_documents_summed(arch):
    _check_model_gradients(MODELS[arch](), DOCS, "pallas-interpret", 1e-5)


# ----------------------------------------------------------------------- compiled, on a GPU
# Wider models with the kernels' real shapes (Mamba2: headdim 64, d_state 64; Mamba-1: d_state
# 16) over 1,000 tokens: boundaries at 1, on chunk edges (64, 256), inside chunks, several
# whole chunks without one, length-1 documents.
GPU_MODELS = {
    "mamba2": lambda: lmj.Mamba2Config(d_model=256, n_layer=2, vocab_size=512, d_state=64,
                                       headdim=64, ngroups=1, chunk_size=64),
    "mamba1": lambda: lmj.MambaConfig(d_model=256, n_layer=2, vocab_size=512, d_state=16),
}
GPU_DOCS = (1, 63, 192, 1, 300, 5, 437, 1)


@pytest.mark.parametrize("arch", list(GPU_MODELS))
@pytest.mark.gpu
@gpu_only
def test_model_pallas_packed_gpu(arch):
    with jax.default_matmul_precision("highest"):
        _check_model_forward(arch, GPU_MODELS[arch](), GPU_DOCS, "pallas", 1e-5)


@pytest.mark.parametrize("arch", list(GPU_MODELS))
@pytest.mark.gpu
@gpu_only
def test_model_pallas_packed_gradients_gpu(arch):
    with jax.default_matmul_precision("highest"):
        _check_model_gradients(GPU_MODELS[arch](), GPU_DOCS, "pallas", 1e-5)

