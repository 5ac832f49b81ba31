"""Generation options: prompt forms (1-D, ragged lists), min-p / top-k / top-p and the repetition
penalty against transformers' own logits processors, several EOS ids and the pad after them,
logprobs, PRNG key vs seed, streaming, stop strings, no recompilation for new option values,
short reprs, and the persistent compile cache.

The model is `Mamba2Config.tiny(vocab_size=257)` (the byte tokenizer's vocabulary; the programs
are shared with tests/test_language_model.py), its untied head scaled up so that greedy
continuations vary. Prompts of 5 and 3 tokens and 12 new tokens throughout, so
that the tests share compiled programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import longmamba_jax as lmj
from longmamba_jax.generation.generate import _decode_loop
from longmamba_jax.generation.sampling import Sampling, make_sampler, repetition_penalty, seen_ids

VOCAB = 257
N = 12
PAD = 260  # a padded-vocabulary id (the model pads 257 to 264): never generated


def tiny_params():
    """A tiny Mamba2 with an untied head scaled up (a tied random head would make every token
    continue with itself), so that greedy continuations vary."""
    config = lmj.Mamba2Config.tiny(vocab_size=VOCAB, tie_embeddings=False)
    p = jax.jit(lmj.init_params, static_argnums=(0, 1))(config, 0)  # one compile, not many
    head = p.weights["lm_head"]["kernel"]
    return lmj.Params({**p.weights, "lm_head": {"kernel": head * 40}}, p.config)


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def _prompt(length, seed):
    return np.random.default_rng(seed).integers(0, 256, length).astype(np.int32)


P5, P3 = _prompt(5, 1), _prompt(3, 2)


def _padded(rows):
    """The left-padded batch [b, 5] and its mask, as the list form builds it."""
    tokens = np.zeros((len(rows), 5), np.int32)
    mask = np.zeros((len(rows), 5), np.int32)
    for i, r in enumerate(rows):
        tokens[i, 5 - len(r):], mask[i, 5 - len(r):] = r, 1
    return tokens, mask


# ----------------------------------------------------------------------------------------------
# Logits processors vs transformers


WARPERS = [(1.0, None, None, 0.1), (0.7, 5, None, 0.2), (1.3, None, 0.6, 0.05),
           (1.0, 8, 0.8, 0.3), (0.5, None, 0.9, None)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", WARPERS)
def test_warpers_match_transformers(temperature, top_k, top_p, min_p):
    """temperature → top-k → top-p → min-p, as transformers chains them when sampling."""
    scores = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) * 2
    chain = [TemperatureLogitsWarper(temperature)]
    chain += [TopKLogitsWarper(top_k)] if top_k else []
    chain += [TopPLogitsWarper(top_p)] if top_p else []
    chain += [MinPLogitsWarper(min_p)] if min_p is not None else []
    want = scores.clone()
    for warper in chain:
        want = warper(None, want)
    got = np.asarray(Sampling(temperature, top_k, top_p, min_p).process(jnp.asarray(scores)))
    want = want.numpy()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    assert (~np.isfinite(want)).sum() > 0  # the filters remove something


def test_min_p_hand_computed():
    """probs (0.5, 0.3, 0.15, 0.05), min_p 0.2: threshold 0.2 · 0.5 = 0.1 keeps three ids."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    got = np.asarray(Sampling(1.0, min_p=0.2).process(logits))[0]
    np.testing.assert_array_equal(np.isfinite(got), [True, True, True, False])


def test_repetition_penalty_matches_transformers():
    ids = torch.tensor([[3, 5, 5, 0, 9], [1, 2, 3, 4, 1]])
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(1)) * 3
    scores[0, 3], scores[0, 5] = 2.0, -2.0  # one seen logit of each sign, for certain
    want = RepetitionPenaltyLogitsProcessor(1.8)(ids, scores.clone()).numpy()
    seen = seen_ids(jnp.asarray(ids.numpy()), None, 12)
    got = np.asarray(repetition_penalty(jnp.asarray(scores.numpy()), seen, 1.8))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[0, [3, 5]], [2.0 / 1.8, -2.0 * 1.8], rtol=1e-6)


def test_option_validation(params):
    assert Sampling(1.0, top_p=1.0).top_p is None and Sampling(1.0, min_p=0.0).min_p is None
    assert make_sampler(0.5, min_p=0.1) == Sampling(0.5, None, None, 0.1)
    bad = [dict(min_p=0.1), dict(temperature=1.0, min_p=1.5), dict(repetition_penalty=0.0),
           dict(seed=1, key=jax.random.PRNGKey(1)), dict(key=np.zeros(3, np.uint32)),
           dict(stop_strings=["x"]), dict(sync_every=0, streamer=print)]
    match = ["min_p", "min_p", "repetition_penalty", "not both", "key", "tokenizer",
             "sync_every"]
    for kw, m in zip(bad, match, strict=True):
        with pytest.raises(ValueError, match=m):
            lmj.generate(params, P5, max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        lmj.generate(params, [P5, []], max_new_tokens=2)
    with pytest.raises(ValueError, match="integer"):
        lmj.generate(params, [[1.5, 2.0], [3.0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        lmj.generate(params, [P5, P3], max_new_tokens=2, attention_mask=np.ones((2, 5)))


# ----------------------------------------------------------------------------------------------
# Prompt forms, EOS, pad


def test_ragged_prompts_equal_each_alone(params):
    alone = [np.asarray(lmj.generate(params, p[None], max_new_tokens=N))[0] for p in (P5, P3)]
    rows = lmj.generate(params, [P5, list(P3)], max_new_tokens=N)  # an array and a list
    assert isinstance(rows, list) and len(rows) == 2
    for got, want in zip(rows, alone, strict=True):
        assert got.dtype == np.int32 and got.shape == (N,)
        np.testing.assert_array_equal(got, want)
    assert len(set(alone[0].tolist())) > 3, "degenerate test model: greedy output barely varies"
    one = lmj.generate(params, P5, max_new_tokens=N)  # 1-D in, 1-D out
    assert one.shape == (N,)
    np.testing.assert_array_equal(np.asarray(one), alone[0])
    np.testing.assert_array_equal(np.asarray(lmj.generate(params, P5.tolist(),
                                                          max_new_tokens=N)), alone[0])


def test_several_eos_ids_and_pad_after(params):
    tokens, mask = _padded([P5, P3])
    free = np.asarray(lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=N))
    eos = [int(free[0, 3]), int(free[1, 6])]  # either id ends either row
    stop = [min(k for k in range(N) if free[r, k] in eos) for r in range(2)]
    assert min(stop) < N - 1
    out = np.asarray(lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=N,
                                  eos_token_id=eos, pad_token_id=PAD))
    default = np.asarray(lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=N,
                                      eos_token_id=eos))
    rows = lmj.generate(params, [P5, P3], max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    for r in range(2):
        np.testing.assert_array_equal(out[r, : stop[r] + 1], free[r, : stop[r] + 1])
        assert (out[r, stop[r] + 1:] == PAD).all()  # the pad id, not the EOS again
        assert (default[r, stop[r] + 1:] == eos[0]).all()  # no pad id: the first EOS (as HF)
        np.testing.assert_array_equal(rows[r], free[r, : stop[r] + 1])  # cut after its EOS


# ----------------------------------------------------------------------------------------------
# Logprobs, repetition penalty and sampling in the loop


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logprobs_are_log_softmax_of_the_logits(params):
    out = lmj.generate(params, P5, max_new_tokens=N, return_logits=True, return_logprobs=True)
    assert out.tokens.shape == (1, N) and out.logprobs.shape == (1, N)
    logits = np.asarray(out.logits, np.float64)[0, :, :VOCAB]
    tokens = np.asarray(out.tokens)[0]
    want = _log_softmax(logits)[np.arange(N), tokens]
    np.testing.assert_allclose(np.asarray(out.logprobs)[0], want, atol=2e-5)
    assert (np.argmax(logits, -1) == tokens).all()


def test_repetition_penalty_in_the_loop(params):
    """Each token is the argmax of the penalized raw logits over the prompt + the tokens so far;
    its logprob is under the penalized logits. p < 1 favours seen ids (transformers allows it):
    here that changes the continuation, so the check bites."""
    plain = np.asarray(lmj.generate(params, P5, max_new_tokens=N))
    changed = []
    for p in (1.7, 0.4):
        out = lmj.generate(params, P5, max_new_tokens=N, repetition_penalty=p,
                           return_logits=True, return_logprobs=True)
        logits = np.asarray(out.logits, np.float64)[0, :, :VOCAB]
        tokens = np.asarray(out.tokens)[0]
        for t in range(N):
            seen = np.zeros(VOCAB, bool)
            seen[np.concatenate([P5, tokens[:t]])] = True
            x = np.where(seen, np.where(logits[t] < 0, logits[t] * p, logits[t] / p), logits[t])
            assert int(np.argmax(x)) == tokens[t]
            np.testing.assert_allclose(out.logprobs[0, t], _log_softmax(x)[tokens[t]],
                                       atol=2e-5)
        changed.append(not np.array_equal(tokens, plain))
    assert changed[1], "the penalty changed nothing: the test is weak"


def test_sampling_key_equals_seed_and_filters(params):
    kw = dict(max_new_tokens=N, temperature=1.0, top_k=20, min_p=0.1, return_logits=True)
    a = lmj.generate(params, P5, seed=3, **kw)
    b = lmj.generate(params, P5, key=jax.random.PRNGKey(3), **kw)
    c = lmj.generate(params, P5, key=jax.random.key(3), **kw)
    d = lmj.generate(params, P5, seed=4, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(d.tokens))
    for out in (a, d):
        allowed = np.isfinite(np.asarray(Sampling(1.0, 20, None, 0.1).process(
            jnp.asarray(out.logits[0, :, :VOCAB]))))  # [N, VOCAB]: what may be drawn
        assert allowed[np.arange(N), np.asarray(out.tokens)[0]].all()
        assert (allowed.sum(-1) < 20).any()  # min-p cuts below top-k somewhere: it bites


def test_new_option_values_do_not_recompile(params):
    """Sampler values, max_new_tokens within one buffer width (16), the number of EOS ids
    (up to 4) and the key's form are inputs of one compiled loop, not constants of new ones."""
    lmj.generate(params, P5, max_new_tokens=N, temperature=0.7, top_p=0.9, min_p=0.05,
                 repetition_penalty=1.2)
    size = _decode_loop._cache_size()
    lmj.generate(params, P5, max_new_tokens=N - 2, temperature=1.3, top_p=0.5, min_p=0.2,
                 repetition_penalty=1.5, eos_token_id=[3, 4, 5], key=jax.random.PRNGKey(7))
    assert _decode_loop._cache_size() == size


# ----------------------------------------------------------------------------------------------
# Streaming and stop strings


class LetterTokenizer:
    """Id i decodes to the letter 'a' + i mod 26 (a tokenizer whose text is easy to reason on)."""

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def test_streaming_yields_the_final_tokens(params):
    tokens, mask = _padded([P5, P3])
    eos = [int(np.asarray(lmj.generate(params, P3, max_new_tokens=N))[4])]  # row 1 ends early
    kw = dict(attention_mask=mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    final = np.asarray(lmj.generate(params, tokens, **kw))
    seen = []
    streamed = np.asarray(lmj.generate(params, tokens, streamer=seen.append, **kw))
    np.testing.assert_array_equal(streamed, final)
    for sync_every in (1, 5):
        cols = list(lmj.stream_generate(params, tokens, sync_every=sync_every, **kw))
        assert all(c.shape == (2,) for c in cols)
        np.testing.assert_array_equal(np.stack(cols, 1), final[:, : len(cols)])
        np.testing.assert_array_equal(np.stack(cols, 1), np.stack(seen, 1))
    cols = list(lmj.stream_generate(params, tokens, sync_every=4, decode_impl="unrolled", **kw))
    np.testing.assert_array_equal(np.stack(cols, 1), final[:, : len(cols)])  # layers split once
    ints = list(lmj.stream_generate(params, P5, max_new_tokens=N))  # one prompt: ints
    assert all(isinstance(t, int) for t in ints)
    np.testing.assert_array_equal(ints, np.asarray(lmj.generate(params, P5, max_new_tokens=N)))

    class Recorder:  # transformers' streamer protocol: the prompt first, then each step, end()
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(np.asarray(value))

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    lmj.generate(params, tokens, streamer=rec, **kw)
    np.testing.assert_array_equal(rec.calls[0], tokens)
    assert rec.calls[-1] == "end" and len(rec.calls) == len(seen) + 2


def test_stop_strings(params):
    """A row ends at the first token whose decoded text contains a stop string: kept, then the
    pad id; the other row runs on; sliced checks (sync_every 1 and 5) agree."""
    tok = LetterTokenizer()
    tokens, mask = _padded([P5, P3])
    free = np.asarray(lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=N))
    text = tok.decode(free[0])
    stop = text[4:6]  # spans tokens 4 and 5 of row 0
    t0 = min(t for t in range(N) if stop in tok.decode(free[0, : t + 1]))
    assert t0 <= 5
    for sync_every in (1, 5):
        out = lmj.generate(params, tokens, attention_mask=mask, max_new_tokens=N,
                           stop_strings=[stop, "zzzzzzzz"], tokenizer=tok, pad_token_id=PAD,
                           sync_every=sync_every, return_logprobs=True)
        got = np.asarray(out.tokens)
        np.testing.assert_array_equal(got[0, : t0 + 1], free[0, : t0 + 1])
        assert (got[0, t0 + 1:] == PAD).all() and int(out.lengths[0]) == t0 + 1
        assert (np.asarray(out.logprobs)[0, t0 + 1:] == 0).all()
        t1 = min((t for t in range(N) if stop in tok.decode(free[1, : t + 1])), default=N - 1)
        np.testing.assert_array_equal(got[1, : t1 + 1], free[1, : t1 + 1])
    rows = lmj.generate(params, [P5, P3], max_new_tokens=N, stop_strings=stop, tokenizer=tok)
    np.testing.assert_array_equal(rows[0], free[0, : t0 + 1])
    streamed = list(lmj.stream_generate(params, P5, max_new_tokens=N, stop_strings=stop,
                                        tokenizer=tok, sync_every=8))  # no pad ids after it
    np.testing.assert_array_equal(streamed, free[0, : t0 + 1])


# ----------------------------------------------------------------------------------------------
# Reprs and the compile cache


def test_reprs_are_short(params):
    r = repr(params)
    assert r.startswith("Params(mamba2, 2 layers, d_model=32, ") and r.endswith("float32)")
    assert "K params" in r and len(r) < 300
    demo = lmj.demo_model()
    for obj in (demo, demo.params, demo.calibration):
        assert len(repr(obj)) < 300, repr(obj)[:400]
    assert repr(demo.params) == "Params(mamba2, 6 layers, d_model=384, 5.8M params, bfloat16)"
    assert jax.tree.leaves(params)  # still a pytree of its weights


@pytest.fixture
def restore_compile_cache():
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    cc.reset_cache()


def test_compile_cache_writes_then_hits(tmp_path, monkeypatch, capfd, restore_compile_cache):
    from longmamba_jax import compile_cache

    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)  # as if JAX's own variable were unset
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(compile_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if compile_cache.sys.platform.startswith("linux"):
        assert compile_cache.resolve_cache_dir() == tmp_path / "xdg" / "longmamba_jax" / "jax"
    path = compile_cache.enable_compile_cache(tmp_path / "cache")
    assert path == tmp_path / "cache" and not any(path.iterdir())
    events = []
    listener = lambda e, **_: events.append(e)
    jax.monitoring.register_event_listener(listener)
    try:
        def f(x):
            return jnp.sin(x) * 3.0 + 1.25  # a program no other test compiles

        jax.jit(f)(jnp.arange(7.0)).block_until_ready()
        assert any(path.iterdir()), "nothing was written to the cache"
        jax.clear_caches()  # drop the in-memory programs: the next call must come from disk
        jax.jit(f)(jnp.arange(7.0)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert "/jax/compilation_cache/cache_hits" in events
    assert capfd.readouterr().err.count("compiling (first run only") == 1  # once, cold
