"""Generation: prefill + recurrent decode vs the full
forward and vs transformers' `generate`; chunked prefill; padding; EOS; sampling filters;
no per-step recompilation; method plumbing (LongMamba filter, DeciMamba).

Models are tiny perturbed transformers checkpoints (`torch_models.py`), loaded through
`longmamba_jax.load` like a user would. Tolerances: fp32, ‖a − b‖ / ‖b‖ ≤ 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_models import make_torch_model, rel_err, save_hf, torch

import longmamba_jax as lmj
from longmamba_jax.generation.generate import _decode_loop, _step
from longmamba_jax.generation.sampling import Greedy, Sampling, make_sampler, sample_logits
from longmamba_jax.model import LayerFilters

pytestmark = pytest.mark.torch

VOCAB = 67  # transformers checkpoints carry no vocabulary padding (see test_padded_vocab_...)
RTOL = 1e-5
# Most tests share batch 2, prompt length 11 (not a multiple of chunk_size 8) and 24 new tokens,
# so that they reuse compiled programs: CPU time here is mostly XLA compiles.
B, L, N = 2, 11, 24

# name -> (arch, transformers config overrides)
MODELS = {
    "mamba1": ("mamba1", dict(tie_word_embeddings=False)),
    "mamba2-g1": ("mamba2", dict(n_groups=1, tie_word_embeddings=False)),
    "mamba2-g2": ("mamba2", dict(n_groups=2, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, (arch, overrides) in MODELS.items():
        model = make_torch_model(arch, **overrides)
        out[name] = (model, lmj.load(save_hf(model, tmp_path_factory.mktemp(name))))
    return out


def _tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _copy(cache):
    return jax.tree.map(jnp.copy, cache)


def _assert_close(a, b, rtol=RTOL, what=""):
    err = rel_err(a, b)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


# ----------------------------------------------------------------------------------------------
# Cached decode == full forward


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_decode_matches_forward(models, name):
    """prefill(prompt) + decode_step over the rest == forward(whole sequence), every position;
    prompts of length 1, 2 (< d_conv − 1 + 1) and 11 (not a multiple of chunk_size 8)."""
    _, params = models[name]
    total = 16
    tokens = _tokens(B, total, seed=1)
    full = np.asarray(lmj.forward(params, tokens))  # [b, total, V]
    for prompt_len in (1, 2, L):
        logits, cache = lmj.prefill(params, tokens[:, :prompt_len])
        assert logits.dtype == jnp.float32 and cache.ssm.dtype == jnp.float32
        _assert_close(logits, full[:, prompt_len - 1], what=f"prefill len {prompt_len}")
        for t in range(prompt_len, total):
            logits, cache = lmj.decode_step(params, cache, tokens[:, t])
            _assert_close(logits, full[:, t], what=f"prompt {prompt_len}, step at {t}")


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_prefill_matches_one_shot(models, name):
    _, params = models[name]
    tokens = _tokens(B, L, seed=2)
    logits, cache = lmj.prefill(params, tokens)
    _, first = lmj.prefill(params, tokens[:, :2])  # uneven split 2 + 9, across a chunk boundary
    logits2, cache2 = lmj.prefill(params, tokens[:, 2:], cache=first)
    _assert_close(logits2, logits, what="logits")
    _assert_close(cache2.conv, cache.conv, what="conv cache")
    _assert_close(cache2.ssm, cache.ssm, what="ssm cache")


# ----------------------------------------------------------------------------------------------
# Greedy generation == transformers


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(models, name):
    model, params = models[name]
    prompts = _tokens(B, L, seed=3)
    n = N
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=VOCAB - 1, return_dict_in_generate=True, output_logits=True,
        )
    ref_ids = ref.sequences[:, prompts.shape[1]:].numpy()
    ref_logits = torch.stack(ref.logits, dim=1).numpy()  # [b, n, VOCAB]
    out = lmj.generate(params, prompts, max_new_tokens=n, return_logits=True)
    assert out.tokens.dtype == jnp.int32 and out.tokens.shape == (2, n)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_ids)
    assert len(np.unique(ref_ids)) > 4, "degenerate test model: greedy output barely varies"
    _assert_close(np.asarray(out.logits)[..., :VOCAB], ref_logits, rtol=1e-4, what="step logits")
    np.testing.assert_array_equal(np.asarray(out.lengths), [n, n])
    assert int(out.num_steps) == n - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_left_padded_batch_matches_singles(models, name):
    """Row 0 fills the width, row 1 (length 2 < d_conv) is mostly padding: each row's tokens
    and logits equal the sequence generated alone."""
    _, params = models[name]
    lengths = (L, 2)
    batch = np.full((B, L), 5, np.int32)  # arbitrary ids under the padding: must not matter
    mask = np.zeros((B, L), np.int32)
    singles = []
    for i, length in enumerate(lengths):
        prompt = _tokens(1, length, seed=10 + i)
        batch[i, L - length:] = prompt[0]
        mask[i, L - length:] = 1
        singles.append(lmj.generate(params, prompt, max_new_tokens=N, return_logits=True))
    out = lmj.generate(params, batch, attention_mask=mask, max_new_tokens=N, return_logits=True)
    for i, single in enumerate(singles):
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), np.asarray(single.tokens[0]))
        _assert_close(out.logits[i], single.logits[0], what=f"sequence {i} logits")


# ----------------------------------------------------------------------------------------------
# EOS, padding, early exit


def test_eos_stops_pads_and_exits_early(models):
    _, params = models["mamba2-g1"]
    prompts = _tokens(B, L, seed=4)
    free = np.asarray(lmj.generate(params, prompts, max_new_tokens=N, return_logits=True).tokens)
    eos = [int(free[0, 3]), int(free[1, 5])]  # either id ends either row
    pad = VOCAB - 1
    out = lmj.generate(params, prompts, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad,
                       return_logits=True)
    default_pad = lmj.generate(params, prompts, max_new_tokens=N, eos_token_id=eos,
                               return_logits=True)
    tokens = np.asarray(out.tokens)
    for row in range(B):
        stop = min(k for k in range(N) if free[row, k] in eos)
        np.testing.assert_array_equal(tokens[row, : stop + 1], free[row, : stop + 1])
        assert (tokens[row, stop + 1:] == pad).all()
        assert (np.asarray(default_pad.tokens)[row, stop + 1:] == eos[0]).all()
        assert int(out.lengths[row]) == stop + 1
    # The loop ran only until the last sequence stopped.
    assert int(out.num_steps) == int(np.max(out.lengths)) - 1 < N - 1


# ----------------------------------------------------------------------------------------------
# Sampling


def _expected_distribution(logits, temperature, top_k, top_p):
    """numpy version of transformers' TemperatureLogitsWarper → TopK → TopP, for one row."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    if top_p is not None:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        before = np.cumsum(p) - p
        remove = order[before >= top_p]
        x[remove] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


SAMPLERS = [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.6), (1.0, 5, 0.8), (0.5, None, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLERS)
def test_sampling_distribution(temperature, top_k, top_p):
    """The filtered distribution is exactly transformers' one, padded ids are never drawn, and
    the empirical frequencies of 100k draws match it."""
    vocab, padded = 10, 16
    logits = jnp.asarray([1.0, 2.5, -0.5, 2.0, 0.3, 1.7, -2.0, 0.9, 2.2, 0.0, 9, 9, 9, 9, 9, 9],
                         jnp.float32)[None]
    sampler = make_sampler(temperature, top_k, top_p)
    want = _expected_distribution(logits[0, :vocab], temperature, top_k, top_p)
    masked = jnp.where(jnp.arange(padded) < vocab, logits, -jnp.inf)
    got = np.asarray(jax.nn.softmax(sampler.process(masked), axis=-1))[0]
    np.testing.assert_allclose(got[:vocab], want, atol=1e-6)
    assert (got[vocab:] == 0).all()

    draws = 100_000
    ids = np.asarray(sample_logits(jnp.broadcast_to(logits, (draws, padded)),
                                   jax.random.PRNGKey(0), sampler, vocab))
    counts = np.bincount(ids, minlength=padded)
    assert counts[vocab:].sum() == 0, "a padded vocabulary id was sampled"
    assert counts[:vocab][want == 0].sum() == 0, "an id outside top-k / top-p was sampled"
    freq = counts[:vocab] / draws
    sigma = np.sqrt(want * (1 - want) / draws)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12)


def test_sampler_validation():
    assert make_sampler(0.0) == Greedy()
    assert make_sampler(0.5, top_k=3) == Sampling(0.5, 3, None)
    with pytest.raises(ValueError, match="top_k"):
        make_sampler(0.0, top_k=3)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(-1.0)
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        make_sampler(1.0, top_k=0)


def test_sampled_generation_reproducible_and_filtered(models):
    _, params = models["mamba2-g2"]
    prompts = _tokens(B, L, seed=5)
    kw = dict(max_new_tokens=N, temperature=1.0, top_k=3, return_logits=True)
    a = lmj.generate(params, prompts, seed=1, **kw)
    b = lmj.generate(params, prompts, seed=1, **kw)
    c = lmj.generate(params, prompts, seed=2, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    for out in (a, c):
        top3 = np.argsort(-np.asarray(out.logits)[..., :VOCAB], axis=-1)[..., :3]
        assert (np.asarray(out.tokens)[..., None] == top3).any(-1).all()

    p = lmj.generate(params, prompts, max_new_tokens=N, temperature=1.0, top_p=0.5, seed=3,
                     return_logits=True)
    logits = np.asarray(p.logits)[..., :VOCAB]
    for row in range(B):
        for t in range(N):
            allowed = _expected_distribution(logits[row, t], 1.0, None, 0.5) > 0
            assert allowed[int(p.tokens[row, t])]


# ----------------------------------------------------------------------------------------------
# Compilation


def test_no_recompilation_per_step(models):
    _, params = models["mamba2-g1"]
    prompts = _tokens(B, L, seed=6)
    _, cache = lmj.prefill(params, prompts)
    _, cache = lmj.decode_step(params, cache, prompts[:, 0])  # warm up (any earlier compile)
    size = _step._cache_size()
    for t in range(1, L):
        _, cache = lmj.decode_step(params, cache, prompts[:, t])
    assert _step._cache_size() == size

    lmj.generate(params, prompts, max_new_tokens=N, return_logits=True)
    size = _decode_loop._cache_size()
    lmj.generate(params, prompts[::-1], max_new_tokens=N, return_logits=True)  # same shapes
    assert _decode_loop._cache_size() == size

    # The loop is one while over one step body: its program does not grow with the length.
    def program_size(n):
        logits, cache = lmj.prefill(params, prompts)
        jaxpr = jax.make_jaxpr(
            lambda c, lg: _decode_loop(params, c, lg, jax.random.PRNGKey(0), None,
                                       jnp.zeros((0,), jnp.int32), jnp.int32(0), sampler=Greedy(),
                                       max_new_tokens=n, backend=lmj.resolve_backend("auto"),
                                       return_logits=False)
        )(cache, logits)
        text = str(jaxpr)
        return text.count("while["), len(text)

    (w4, s4), (w64, s64) = program_size(4), program_size(64)
    assert w4 == w64 == 1
    assert abs(s64 - s4) < 200


def test_padded_vocab_ids_never_generated(models):
    """Ids ≥ vocab_size (padding) get −inf before sampling: here their logits dominate."""
    _, params = models["mamba1"]  # untied head
    config = dataclasses.replace(params.config, pad_vocab_size_multiple=8)
    v, v_pad = config.vocab_size, config.padded_vocab_size
    assert v_pad > v + 1
    w = params.weights
    emb = jnp.pad(w["embedding"]["weight"], ((0, v_pad - v), (0, 0)))
    head = jnp.pad(w["lm_head"]["kernel"], ((0, 0), (0, v_pad - v)))
    head = head.at[:, v].set(100 * head[:, 0]).at[:, v + 1].set(-100 * head[:, 0])
    params = lmj.Params({**w, "embedding": {"weight": emb}, "lm_head": {"kernel": head}}, config)
    prompts = _tokens(B, L, seed=12)
    for temperature in (0.0, 1.0):
        out = lmj.generate(params, prompts, max_new_tokens=N, temperature=temperature,
                           return_logits=True)
        assert (np.asarray(out.tokens) < v).all()
        assert (np.argmax(np.asarray(out.logits), -1) >= v).mean() > 0.5  # the test bites


def test_decode_step_donates_and_checks(models):
    _, params = models["mamba1"]
    prompts = _tokens(1, L, seed=7)
    _, cache = lmj.prefill(params, prompts)
    kept, _ = lmj.decode_step(params, cache, prompts[:, 0], donate=False)
    assert not cache.ssm.is_deleted()
    logits, new = lmj.decode_step(params, cache, prompts[:, 0])
    assert cache.ssm.is_deleted()  # donated: the new cache reuses its buffers
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(logits))
    with pytest.raises(ValueError, match="cache shapes"):
        lmj.decode_step(params, new, np.zeros((2,), np.int32))
    with pytest.raises(ValueError, match="token"):
        lmj.decode_step(params, new, np.zeros((1, 1), np.int32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lmj.generate(params, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        lmj.generate(params, prompts, max_new_tokens=2, eos_token_id=VOCAB)
    with pytest.raises(ValueError, match="attention_mask"):
        lmj.generate(params, prompts, max_new_tokens=2, attention_mask=np.ones((1, 4)))
    holed = np.ones((1, L), np.int32)
    holed[0, 1] = 0  # padding inside the prompt: its real tokens are not one run
    with pytest.raises(ValueError, match="one run of real tokens"):
        lmj.generate(params, prompts, max_new_tokens=2, attention_mask=holed)


# ----------------------------------------------------------------------------------------------
# Methods (duck-typed stand-ins with the LongMamba / DeciMamba interface)


@dataclasses.dataclass
class FixedFilter:
    """LongMamba-like: the same θ at every length; records the lengths it was asked for."""

    threshold: float
    filter_decode: bool = False
    asked: list = dataclasses.field(default_factory=list)

    def model_kwargs(self, config, seq_len):
        self.asked.append(seq_len)
        c = config.channels
        is_global = jnp.tile(jnp.arange(c) % 2 == 0, (config.n_layer, 1))
        return {"filters": LayerFilters(is_global, jnp.full((config.n_layer, c), self.threshold))}


@dataclasses.dataclass(frozen=True)
class FixedDecimation:
    layer: int
    keep: int
    keep_last: int = 1

    def model_kwargs(self, config, seq_len):
        return {"decimation": ((self.layer, self.keep, self.keep_last),)}


@pytest.mark.parametrize("name", ["mamba1", "mamba2-g1"])
def test_longmamba_prompt_and_decode_filtering(models, name):
    _, params = models[name]
    prompts = _tokens(B, L, seed=8)
    n = N
    # A threshold near the median Δ, so that the filter changes the result.
    theta = float(np.median(lmj.apply_model(params, prompts, capture_dt=True).dt))
    plain = FixedFilter(theta)
    out = lmj.generate(params, prompts, max_new_tokens=n, method=plain, return_logits=True)
    assert plain.asked == [L]
    first_logits, first_run = np.asarray(out.logits[:, 0]), np.asarray(out.logits)
    # Unfiltered decode: prefill(filtered) then plain steps.
    logits, cache = lmj.prefill(params, prompts, method=plain)
    _assert_close(out.logits[:, 0], logits, what="first logits")
    assert rel_err(logits, lmj.prefill(params, prompts)[0]) > 1e-3  # θ matters
    for t in range(1, n):
        logits, cache = lmj.decode_step(params, cache, out.tokens[:, t - 1])
        _assert_close(out.logits[:, t], logits, what=f"unfiltered step {t}")

    # filter_decode: every step uses θ for prompt + max_new_tokens; with a length-independent θ
    # that equals the filtered full forward over prompt + generated tokens.
    both = FixedFilter(theta, filter_decode=True)
    out = lmj.generate(params, prompts, max_new_tokens=n, method=both, return_logits=True)
    assert both.asked == [L, L + n]
    seq = np.concatenate([prompts, np.asarray(out.tokens)[:, :-1]], axis=1)
    full = np.asarray(lmj.forward(params, seq, method=both))[:, L - 1:]
    _assert_close(out.logits, full, what="filtered decode vs filtered forward")
    _assert_close(first_logits, full[:, 0], what="filtered prompt vs filtered forward")
    assert rel_err(out.logits[:, 1:], first_run[:, 1:]) > 1e-3  # filter_decode changes steps


def test_decimamba_generation(models):
    _, params = models["mamba2-g2"]
    prompts = _tokens(B, L, seed=9)
    n = N
    keep_all = FixedDecimation(layer=1, keep=L - 1)  # keeps every token: must equal vanilla
    out = lmj.generate(params, prompts, max_new_tokens=n, method=keep_all, return_logits=True)
    ref = lmj.generate(params, prompts, max_new_tokens=n, return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    _assert_close(out.logits, ref.logits, what="keep-all decimation")

    deci = lmj.DeciMamba((1,), L_base=4, min_seq_len=1)  # plan ((1, 4, 1),)
    assert deci.model_kwargs(params.config, L) == {"decimation": ((1, 4, 1),)}
    out = lmj.generate(params, prompts, max_new_tokens=n, method=deci, return_logits=True)
    first = np.asarray(lmj.forward(params, prompts, method=deci))[:, -1]
    _assert_close(out.logits[:, 0], first, what="decimated prompt's last logits")
    assert np.isfinite(np.asarray(out.logits)).all()
    with pytest.raises(ValueError, match="keep_last"):
        lmj.generate(params, prompts, max_new_tokens=2,
                     method=lmj.DeciMamba((1,), L_base=4, min_seq_len=1, keep_last=0))
    with pytest.raises(ValueError, match="attention_mask"):
        lmj.generate(params, prompts, max_new_tokens=2, method=deci,
                     attention_mask=np.ones(prompts.shape, np.int32))
    _, cache = lmj.prefill(params, prompts[:, :2])
    with pytest.raises(ValueError, match="chunked prefill"):
        lmj.prefill(params, prompts[:, 2:], cache=cache, method=deci, total_len=L)
