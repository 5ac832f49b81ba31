"""Autoregressive generation: prefill once, then a jitted recurrent decode loop on device.

Both architectures are recurrences with a fixed-size state per layer, so decoding is
    prefill:  (logits_L, cache_L) = model(tokens[0:L])        # full forward, once
    step t:   (logits_t, cache_t) = model_step(cache_{t−1}, token_{t−1})
where `Cache` holds each layer's conv window (the last d_conv − 1 conv inputs) and SSM state, both
fp32. A step costs the same at any context length. `generate` runs all steps inside one
`lax.while_loop` (one compiled step body, the cache updated in place, no Python per token) that
stops early once every sequence has produced an EOS.

Public pieces, for users who build their own loops:
- `prefill(params, tokens, ...) -> (last_logits, cache)`; chunked prefill = call it again on the
  next chunk with the returned cache (and `total_len`, for LongMamba);
- `decode_step(params, cache, token) -> (logits, cache)` (jitted; the input cache is donated
  unless `donate=False`).

Methods (docs/design.md, "LongMamba filtering" and "DeciMamba"):
- LongMamba: the prompt is filtered with θ for the prompt length (for chunked prefill: θ for
  `total_len`, so every chunk uses the same thresholds). Decode steps are unfiltered unless
  `method.filter_decode` is true; then every decode step uses θ for the *final* length
  (prompt length + max_new_tokens, `seq_len` in `decode_step`), computed once outside the loop.
  With a left-padded batch the prompt length is the padded length (θ is static per call).
- DeciMamba: the prompt is decimated in prefill; decoding continues from the decimated cache (the
  recurrent step has nothing to decimate). Chunked prefill is not supported with DeciMamba.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_jax.backends import resolve_backend
from longmamba_jax.generation.decode_steps import (
    DECODE_IMPLS,
    prepare_fused,
    split_layers,
    step_fused,
    step_unrolled,
)
from longmamba_jax.generation.sampling import Sampler, make_sampler, sample_logits
from longmamba_jax.hybrid import is_hybrid, reserve
from longmamba_jax.mixers import ScanBackend
from longmamba_jax.model import (
    Cache,
    LayerFilters,
    Params,
    _check_tokens,
    _mask,
    apply_model,
    empty_cache,
    method_kwargs,
)

f32 = jnp.float32
i32 = jnp.int32


class GenerateOutput(NamedTuple):
    """What `generate(..., return_logits=True)` returns.

    tokens: int32 [b, n] generated ids (n = max_new_tokens), `pad_token_id` after a sequence's EOS.
    logits: fp32 [b, n, V] the raw logits each token was chosen from (V = padded vocabulary);
      rows after a sequence finished are not meaningful (zeros where no step ran).
    lengths: int32 [b] tokens generated per sequence, its EOS included.
    num_steps: int32 [] decode steps run (< n − 1 when every sequence stopped early).
    """

    tokens: jax.Array
    logits: jax.Array
    lengths: jax.Array
    num_steps: jax.Array


# ----------------------------------------------------------------------------------------------
# Prefill and one decode step


def prefill(params: Params, tokens, *, attention_mask=None, cache: Cache | None = None,
            method: Any = None, backend: str = "auto", total_len: int | None = None):
    """Runs the full forward over a prompt (or one chunk of it) and returns the state after it.

    Args:
      params: `Params` from `load` or `init_params`.
      tokens: int [b, l], the prompt or its next chunk.
      attention_mask: [b, l] 1 for real tokens, 0 for left padding (first chunk only).
      cache: the `Cache` returned by the previous chunk, or None to start from zeros.
      method: None, `LongMamba(...)` or `DeciMamba(...)`.
      backend: "auto" | "reference" | "associative" | "pallas" | "pallas-interpret".
      total_len: the whole prompt's length (LongMamba picks θ for it); defaults to l when
        `cache` is None and must be given for a later chunk when a method is used.

    Returns:
      (logits fp32 [b, V] at the last position, `Cache` after the last token).

    Raises:
      ValueError: bad tokens / mask, a chunk without `total_len` under a method, DeciMamba with
        a cache (chunked prefill) or a DeciMamba plan that could drop the last token.
    """
    tokens = _check_tokens(params, tokens)
    batch, length = tokens.shape
    if cache is not None:
        _check_cache(params, cache, batch)
    if total_len is None:
        if cache is not None and method is not None:
            raise ValueError("total_len (the whole prompt's length) is required for a later "
                             "prefill chunk when a method is used")
        total_len = length
    elif isinstance(total_len, bool) or not isinstance(total_len, (int, np.integer)) \
            or total_len < length:
        raise ValueError(f"total_len must be an int >= the chunk length {length}, "
                         f"got {total_len!r}")
    kwargs = method_kwargs(method, params.config, int(total_len))
    if kwargs.get("decimation"):
        if attention_mask is not None:
            raise ValueError("attention_mask (left padding) is not supported with DeciMamba")
        if cache is not None:
            raise ValueError("DeciMamba does not support chunked prefill (cache=...): it "
                             "decimates a whole prompt at once")
        short = [(layer, keep_last) for layer, _, keep_last in kwargs["decimation"]
                 if keep_last < 1]
        if short:
            raise ValueError(f"DeciMamba plan {kwargs['decimation']} has keep_last < 1 in "
                             f"layers {[l for l, _ in short]}: generation needs the last prompt "
                             "token kept (use keep_last >= 1)")
    mask = _mask(attention_mask, tokens)
    if mask is not None:
        _check_left_padding(attention_mask)
    if cache is not None:  # a hybrid model's KV cache: room for this chunk (and the prompt)
        cache = reserve(cache, length, total=int(total_len), dtype=params.dtype)
    out = apply_model(params, tokens, mask=mask, cache=cache,
                      backend=resolve_backend(backend), last_n=1, return_cache=True, **kwargs)
    return out.logits[:, -1], out.cache


def _step_body(params: Params, cache: Cache, token, filters: LayerFilters | None, backend,
               layers=None, impl: str = "scan"):
    """One recurrent step: token int32 [b] -> (logits fp32 [b, V], new cache); with `layers`
    (`split_layers(params)`, or `prepare_fused(params, filters)` for impl="fused") the layers
    run unrolled (`decode_steps.py`)."""
    if impl == "fused":
        return step_fused(params, layers, cache, token, backend)
    if layers is not None:
        return step_unrolled(params, layers, cache, token, filters, backend)
    out = apply_model(params, token[:, None], filters=filters, cache=cache, backend=backend,
                      return_cache=True, step=True)
    return out.logits[:, 0], out.cache


_step = jax.jit(_step_body, static_argnames=("backend",), donate_argnames=("cache",))
_step_keep = jax.jit(_step_body, static_argnames=("backend",))  # donate=False


def decode_step(params: Params, cache: Cache, token, *, method: Any = None,
                backend: str = "auto", seq_len: int | None = None, donate: bool = True):
    """Feeds one token per sequence through the recurrent step.

    By default the input `cache` is donated: its buffers are reused for the returned cache, so
    it must not be used after the call (pass `donate=False` to keep it valid, e.g. to branch
    several continuations from one state).

    Args:
      params: `Params`.
      cache: `Cache` from `prefill` or a previous `decode_step` (or `empty_cache`).
      token: int [b], the last token of each sequence.
      method: None, or a method; only a LongMamba with `filter_decode=True` changes the step
        (it filters with θ for `seq_len`). DeciMamba's decimation happened in prefill.
      backend: scan backend name (the step itself is a plain recurrence on every backend).
      seq_len: the length whose LongMamba thresholds filter this step (e.g. the final length
        of the generation); required when filtering.
      donate: reuse the input cache's buffers for the output (see above).

    Returns:
      (logits fp32 [b, V], the new `Cache`).
    """
    token = jnp.asarray(token)
    if token.ndim != 1 or not jnp.issubdtype(token.dtype, jnp.integer):
        raise ValueError(f"token must be int [batch], got {token.dtype} {token.shape}")
    _check_cache(params, cache, token.shape[0])
    cache = reserve(cache, 1, dtype=params.dtype, double=True)  # hybrid models: KV room
    filters = _decode_filters(method, params, seq_len)
    step = _step if donate else _step_keep
    return step(params, cache, token.astype(i32), filters, resolve_backend(backend))


def _decode_filters(method, params: Params, seq_len: int | None) -> LayerFilters | None:
    if method is None or not getattr(method, "filter_decode", False):
        return None
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len (a positive int) is required to filter decode steps "
                         f"(method.filter_decode=True), got {seq_len!r}")
    try:
        return _cached_filters(method, params.config, seq_len)
    except TypeError:  # an unhashable method object: compute every time
        return method_kwargs(method, params.config, seq_len).get("filters")


@functools.lru_cache(maxsize=16)
def _cached_filters(method, config, seq_len: int) -> LayerFilters | None:
    # decode_step in a user's Python loop asks for the same length at every token.
    return method_kwargs(method, config, seq_len).get("filters")


def _check_left_padding(attention_mask) -> None:
    """Padding must be on the left (mask rows 0…0 1…1) and every row needs a real token."""
    if isinstance(attention_mask, jax.core.Tracer):
        return  # traced by the caller: cannot be checked here
    mask = np.asarray(attention_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens)")
    if (np.diff(mask, axis=1) < 0).any() or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding (each row 0…0 1…1, last column "
                         "1); right padding is not supported")


def _check_cache(params: Params, cache, batch: int) -> None:
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be longmamba_jax.Cache, got {type(cache).__name__}")
    conv, ssm = _cache_shapes(params.config, batch)
    if cache.conv.shape != conv or cache.ssm.shape != ssm:
        raise ValueError(
            f"cache shapes conv {cache.conv.shape}, ssm {cache.ssm.shape} do not match the model "
            f"at batch {batch} (expected conv {conv}, ssm {ssm})"
        )


@functools.lru_cache(maxsize=64)
def _cache_shapes(config, batch: int):
    """(conv shape, ssm shape) of `empty_cache(config, batch)`, without building it."""
    ref = jax.eval_shape(lambda: empty_cache(config, batch))
    return ref.conv.shape, ref.ssm.shape


# ----------------------------------------------------------------------------------------------
# The decode loop


@functools.partial(
    jax.jit,
    static_argnames=("sampler", "max_new_tokens", "backend", "return_logits", "decode_impl"),
    donate_argnames=("cache",),
)
def _decode_loop(params: Params, cache: Cache, logits0, key, filters, eos_ids, pad_id, *,
                 sampler: Sampler, max_new_tokens: int, backend: ScanBackend,
                 return_logits: bool, decode_impl: str = "scan"):
    """Samples token 0 from the prefill logits, then runs up to max_new_tokens − 1 steps.

    logits0 fp32 [b, V]; eos_ids int32 [k] (k may be 0); pad_id int32 [].
    Returns (tokens [b, n], logits [b, n, V] or None, lengths [b], num_steps [], final cache);
    the cache is returned so that XLA can reuse the donated input buffers for the loop state.
    """
    vocab = params.config.vocab_size
    batch, v_pad = logits0.shape
    n = max_new_tokens

    def pick(logits, i):
        return sample_logits(logits, jax.random.fold_in(key, i), sampler, vocab)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)  # [b]

    tok = pick(logits0, 0)
    tokens = jnp.full((batch, n), pad_id, i32).at[:, 0].set(tok)
    scores = jnp.zeros((batch, n, v_pad), f32).at[:, 0].set(logits0) if return_logits else None
    done = is_eos(tok)
    lengths = jnp.ones((batch,), i32)
    layers = None  # per-layer weights, split once outside the loop
    if decode_impl == "unrolled":
        layers = split_layers(params)
    elif decode_impl == "fused":
        layers = prepare_fused(params, filters)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, tokens, lengths, scores = state
        logits, cache = _step_body(params, cache, tok, filters, backend, layers,
                                   decode_impl)  # [b, V]
        nxt = jnp.where(done, pad_id, pick(logits, i))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        if scores is not None:
            scores = jax.lax.dynamic_update_slice(scores, logits[:, None], (0, i, 0))
        lengths = lengths + (~done).astype(i32)
        return i + 1, nxt, cache, done | is_eos(nxt), tokens, lengths, scores

    state = (jnp.asarray(1, i32), tok, cache, done, tokens, lengths, scores)
    i, _, cache, _, tokens, lengths, scores = jax.lax.while_loop(cond, body, state)
    return tokens, scores, lengths, i - 1, cache


def generate(params: Params, tokens, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             attention_mask=None, seed: int = 0, backend: str = "auto", method: Any = None,
             return_logits: bool = False, decode_impl: str = "scan"):
    """Generates `max_new_tokens` tokens after each prompt (greedy at temperature 0).

    Prefill runs once over the prompts; the decode loop is one jitted `lax.while_loop` on device
    (compiled once per batch size, max_new_tokens and sampler; nothing per token). A sequence
    stops after emitting an EOS: its later ids are `pad_token_id`. The loop exits as soon as all
    sequences have stopped.

    Args:
      params: `Params` from `load` or `init_params`.
      tokens: int [b, l] prompts (left-padded when lengths differ, with `attention_mask`).
      max_new_tokens: tokens to generate per sequence (≥ 1).
      temperature: 0 for greedy, else the sampling temperature.
      top_k / top_p: sampling filters (need temperature > 0); see `sampling.py`.
      eos_token_id: an id or a list of ids that end a sequence (None: never stop early).
      pad_token_id: id written after a sequence's EOS (default: the first EOS id, else 0).
      attention_mask: [b, l] 1 for real tokens, 0 for left padding; each sequence then gets
        exactly the tokens it would get alone (greedy).
      seed: PRNG seed for sampling (the draw at step i uses fold_in(PRNGKey(seed), i)).
      backend: scan backend for the prefill ("auto", "reference", "associative", "pallas", ...).
      method: None, `LongMamba(...)` or `DeciMamba(...)` (see the module docstring).
      return_logits: also return the logits of every step (memory b × n × V fp32).
      decode_impl: "scan" (the layers under one `lax.scan`), "unrolled" (layers unrolled,
        weights split once before the loop) or "fused" (unrolled, Mamba2's conv + SSM + gate
        as one Pallas kernel per layer on the "pallas" backend, projections kept GEMMs at
        batch 1); see `longmamba_jax.generation.decode_steps`. Same results up to fp32 rounding.

    Returns:
      int32 [b, max_new_tokens], or a `GenerateOutput` when return_logits.
    """
    tokens = _check_tokens(params, tokens)
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
    if decode_impl != "scan" and is_hybrid(params.config):
        raise ValueError(f"decode_impl={decode_impl!r} serves the pure Mamba models; a "
                         f"{params.config.family} model decodes with decode_impl='scan'")
    try:
        n_new = operator.index(max_new_tokens)
    except TypeError:
        n_new = 0
    if isinstance(max_new_tokens, bool) or n_new < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    max_new_tokens = n_new
    sampler = make_sampler(temperature, top_k, top_p)
    vocab = params.config.vocab_size
    eos_ids = _token_ids(eos_token_id, "eos_token_id", vocab)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    else:
        pad_token_id = _token_ids(pad_token_id, "pad_token_id", params.config.padded_vocab_size)
        if len(pad_token_id) != 1:
            raise ValueError(f"pad_token_id must be one int, got {pad_token_id!r}")
        pad_token_id = pad_token_id[0]
    prompt_len = tokens.shape[1]
    logits0, cache = prefill(params, tokens, attention_mask=attention_mask, method=method,
                             backend=backend)
    cache = reserve(cache, max_new_tokens, dtype=params.dtype)  # hybrid models: KV room
    filters = _decode_filters(method, params, prompt_len + max_new_tokens)
    out_tokens, scores, lengths, steps, _ = _decode_loop(
        params, cache, logits0, jax.random.PRNGKey(seed), filters,
        jnp.asarray(eos_ids, i32).reshape(-1), jnp.asarray(pad_token_id, i32),
        sampler=sampler, max_new_tokens=max_new_tokens, backend=resolve_backend(backend),
        return_logits=return_logits, decode_impl=decode_impl,
    )
    if return_logits:
        return GenerateOutput(out_tokens, scores, lengths, steps)
    return out_tokens


def _token_ids(value, name: str, vocab: int) -> list[int]:
    if value is None:
        return []
    try:
        ids = [operator.index(value)] if jnp.ndim(value) == 0 else \
            [operator.index(t) for t in value]
    except TypeError:
        ids = None
    if not ids or any(isinstance(t, bool) or not 0 <= t < vocab for t in ids):
        raise ValueError(f"{name} must be an int (or a non-empty list of ints) in [0, {vocab}), "
                         f"got {value!r}")
    return ids
