"""Autoregressive generation: prefill once, then a jitted recurrent decode loop on device.

Both architectures are recurrences with a fixed-size state per layer, so decoding is
    prefill:  (logits_L, cache_L) = model(tokens[0:L])        # full forward, once
    step t:   (logits_t, cache_t) = model_step(cache_{t−1}, token_{t−1})
where `Cache` holds each layer's conv window (the last d_conv − 1 conv inputs) and SSM state, both
fp32. A step costs the same at any context length. `generate` runs all steps inside one
`lax.while_loop` (`loop.py`: one compiled step body, the cache updated in place, no Python per
token) that stops early once every sequence has produced an EOS; with a streamer or stop strings
it runs in slices of steps with a host check between them (`streaming.py`). Options, prompt
forms and return types: docs/generation.md.

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
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_jax.backends import resolve_backend
from longmamba_jax.generation.batching import PromptBatch, as_batch, in_form, prompt_seen, rows_of
from longmamba_jax.generation.decode_steps import DECODE_IMPLS
from longmamba_jax.generation.loop import (
    LoopInputs,
    decode_all,
    decode_run,
    decode_start,
    prepare_layers,
)
from longmamba_jax.generation.loop import step_body as _step_body
from longmamba_jax.generation.sampling import Greedy, make_sampler
from longmamba_jax.generation.streaming import StopStrings, as_callback, host_loop
from longmamba_jax.hybrid import is_hybrid, reserve
from longmamba_jax.model import (
    Cache,
    LayerFilters,
    Params,
    _check_tokens,
    _mask,
    apply_model,
    check_token_ids,
    empty_cache,
    method_kwargs,
)
from longmamba_jax.packing import resolve_segment_ids
from longmamba_jax.sharding.mesh import mesh_scope, place_batch, resolve_mesh

f32 = jnp.float32
i32 = jnp.int32


class GenerateOutput(NamedTuple):
    """What `generate(..., return_logits=True)` or `return_logprobs=True` returns: always the
    padded batch (b = 1 for a single prompt), whatever form the prompts came in.

    tokens: int32 [b, n] generated ids (n = max_new_tokens), `pad_token_id` after a row's end.
    logits: fp32 [b, n, V] the raw logits each token was chosen from (V = padded vocabulary),
      or None; rows after a sequence finished are not meaningful (zeros where no step ran).
    lengths: int32 [b] tokens generated per sequence, its EOS (or stop string) included.
    num_steps: int32 [] decode steps run (< n − 1 when every sequence stopped early).
    logprobs: fp32 [b, n] log-probability of each chosen id under the logits it was drawn from
      after the processors (repetition penalty, temperature, top-k/p, min-p), or None; 0 after a
      row's end.
    """

    tokens: jax.Array
    logits: jax.Array | None
    lengths: jax.Array
    num_steps: jax.Array
    logprobs: jax.Array | None = None

    def sequences(self) -> list[np.ndarray]:
        """Each row's tokens cut at its length (numpy int32 [lengths[r]])."""
        return rows_of(self.tokens, self.lengths)


# ----------------------------------------------------------------------------------------------
# Prefill and one decode step


def prefill(params: Params, tokens, *, attention_mask=None, cache: Cache | None = None,
            method: Any = None, backend: str = "auto", total_len: int | None = None,
            segment_ids=None, cu_seqlens=None, mesh=None):
    """Runs the full forward over a prompt (or one chunk of it) and returns the state after it.

    Args:
      params: `Params` from `load` or `init_params`.
      tokens: int [b, l], the prompt or its next chunk.
      attention_mask: [b, l] 1 for real tokens, 0 for padding, left or right (first chunk
        only): each row's logits and cache are those after its own last real token.
      cache: the `Cache` returned by the previous chunk, or None to start from zeros.
      method: None, `LongMamba(...)` or `DeciMamba(...)`.
      backend: "auto" | "reference" | "associative" | "pallas" | "pallas-interpret".
      total_len: the whole prompt's length (LongMamba picks θ for it); defaults to l when
        `cache` is None and must be given for a later chunk when a method is used.
      segment_ids / cu_seqlens: packed documents, as in `forward`; the cache is the last
        document's state (the first document continues `cache`).
      mesh: the `jax.sharding.Mesh` to run on, as in `forward` (default: the weights' own).

    Returns:
      (logits fp32 [b, V] at each row's last real token, `Cache` after it).

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
    segment_ids = resolve_segment_ids(tokens.shape, segment_ids, cu_seqlens)
    if segment_ids is not None and method is not None and cache is not None:
        raise ValueError("packed documents under a method are filtered per document length, "
                         "so the row must be prefilled in one call (no cache)")
    kwargs = method_kwargs(method, params.config, int(total_len), segment_ids, params=params)
    if kwargs.get("rule") is not None and cache is not None:
        raise ValueError(f"the LongMamba rule {kwargs['rule'].kind!r} reads the whole prompt's Δ "
                         "in every layer, so the prompt must be prefilled in one call (no cache, "
                         "no prefill_chunked); rule='threshold' works chunk by chunk")
    if kwargs.get("decimation"):
        if attention_mask is not None:
            raise ValueError("attention_mask (padding) is not supported with DeciMamba")
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
        _check_padding(attention_mask)
    if cache is not None:  # a hybrid model's KV cache: room for this chunk (and the prompt)
        cache = reserve(cache, length, total=int(total_len), dtype=params.dtype)
    mesh = resolve_mesh(params, mesh)
    with mesh_scope(mesh):
        tokens, mask, segment_ids = place_batch(mesh, tokens, mask, segment_ids)
        out = apply_model(params, tokens, mask=mask, cache=cache, segment_ids=segment_ids,
                          backend=resolve_backend(backend), last_n=1, return_cache=True,
                          **kwargs)
    return out.logits[:, -1], out.cache


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
      token: int [b], the last token of each sequence; ids outside [0, padded_vocab_size)
        raise ValueError. Under a caller's `jit` they cannot be checked: such a row's logits
        (and its state from then on) are all NaN, and `checkify` reports them
        (docs/reliability.md, "Token ids").
      method: None, or a method; only a LongMamba with `filter_decode=True` changes the step
        (it filters with θ for `seq_len`). DeciMamba's decimation happened in prefill.
      backend: scan backend name (the step itself is a plain recurrence on every backend).
      seq_len: the length whose LongMamba thresholds filter this step (e.g. the final length
        of the generation); required when filtering.
      donate: reuse the input cache's buffers for the output (see above).

    Returns:
      (logits fp32 [b, V], the new `Cache`).
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params, got {type(params).__name__}")
    token = check_token_ids(token, params.config.padded_vocab_size, ndim=1, name="token")
    _check_cache(params, cache, token.shape[0])
    cache = reserve(cache, 1, dtype=params.dtype, double=True)  # hybrid models: KV room
    filters = _decode_filters(method, params, seq_len)
    step = _step if donate else _step_keep
    return step(params, cache, token, filters, resolve_backend(backend))


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


def _check_padding(attention_mask) -> None:
    """Each row's real tokens must be one run (padding on the left, the right or both: rows
    0…0 1…1 0…0) with at least one real token."""
    if isinstance(attention_mask, jax.core.Tracer):
        return  # traced by the caller: cannot be checked here
    mask = np.asarray(attention_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens)")
    rises = (np.diff(mask, axis=1) > 0).sum(axis=1) + mask[:, 0]  # runs of real tokens
    if not mask.any(axis=1).all() or (rises > 1).any():
        bad = int(np.flatnonzero(~mask.any(axis=1) | (rises > 1))[0])
        raise ValueError(f"attention_mask row {bad} must hold one run of real tokens (padding "
                         "only before and/or after it)")


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


_GREEDY = Greedy()


@functools.partial(
    jax.jit,
    static_argnames=("max_new_tokens", "backend", "return_logits", "return_logprobs",
                     "decode_impl"),
    donate_argnames=("cache",),
)
def _decode_loop(params: Params, cache: Cache, logits0, key, filters, eos_ids, pad_id, *,
                 sampler=_GREEDY, max_new_tokens: int, backend, return_logits: bool,
                 return_logprobs: bool = False, penalty=None, seen=None, limit=None,
                 decode_impl: str = "scan"):
    """The whole decode loop as one program (`loop.decode_all`).

    logits0 fp32 [b, V]; eos_ids int32 [k] (k may be 0); pad_id int32 []; sampler a pytree
    (`Greedy()` / `Sampling`); penalty fp32 [] or None; seen bool [b, V] (with a penalty);
    max_new_tokens sizes the token buffer [b, n]; limit int32 [] (default n) stops earlier, so
    that nearby lengths share one program.
    Returns (tokens [b, n], logits [b, n, V] or None, lengths [b], num_steps [], final cache,
    logprobs [b, n] or None); the cache is returned so that XLA can reuse the donated buffers.
    """
    inp = LoopInputs(key, filters, eos_ids, pad_id, sampler, penalty)
    s = decode_all(params, cache, logits0, inp, seen,
                   max_new_tokens if limit is None else limit, n=max_new_tokens,
                   backend=backend, return_logits=return_logits,
                   return_logprobs=return_logprobs, decode_impl=decode_impl)
    return s.tokens, s.logits, s.lengths, s.i - 1, s.cache, s.logprobs


# The same loop in slices (streaming, stop strings): start once, then resume to `stop_at`.
_decode_start = jax.jit(decode_start, static_argnames=("n", "return_logits", "return_logprobs"),
                        donate_argnames=("cache",))
_decode_run = jax.jit(decode_run, static_argnames=("backend", "decode_impl"),
                      donate_argnames=("state",))
_prepare_layers = jax.jit(prepare_layers, static_argnames=("impl",))


class _Setup(NamedTuple):
    """A checked generation request, prefilled: what the loop needs."""

    params: Params
    batch: PromptBatch
    cache: Cache
    logits0: Any
    inputs: LoopInputs
    seen: Any
    n: int  # max_new_tokens
    n_buffer: int  # token buffer width (n, or n rounded up: see `_buffer_width`)
    backend: Any
    decode_impl: str
    return_logits: bool
    return_logprobs: bool


def _buffer_width(n: int, exact: bool) -> int:
    """n rounded up to a power of two ≥ 16 (max_new_tokens 20 and 30 share a program), or n
    when the per-step logits are kept (they cost b · width · V · 4 bytes)."""
    return n if exact else max(16, 1 << (n - 1).bit_length())


def _setup(params: Params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float | None = None, eos_token_id=None, pad_token_id=None,
           attention_mask=None, seed: int | None = None, key=None, backend: str = "auto",
           method: Any = None, return_logits: bool = False, return_logprobs: bool = False,
           pad_to_multiple_of: int | None = None, decode_impl: str = "scan",
           mesh=None) -> _Setup:
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params (from load/init_params), got "
                        f"{type(params).__name__}")
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
    sampler = make_sampler(temperature, top_k, top_p, min_p)
    penalty = _penalty(repetition_penalty)
    prng = _prng_key(seed, key)
    cfg = params.config
    eos_ids = _token_ids(eos_token_id, "eos_token_id", cfg.vocab_size)
    if pad_token_id is None:
        pad_id = eos_ids[0] if eos_ids else 0  # as transformers: pad = the first EOS id
    else:
        pad_id = _token_ids(pad_token_id, "pad_token_id", cfg.padded_vocab_size)
        if len(pad_id) != 1:
            raise ValueError(f"pad_token_id must be one int, got {pad_token_id!r}")
        pad_id = pad_id[0]
    batch = as_batch(prompts, attention_mask, pad_to_multiple_of)
    tokens = _check_tokens(params, batch.tokens)
    mesh = resolve_mesh(params, mesh)
    if mesh is not None and decode_impl == "fused":
        raise ValueError("decode_impl='fused' runs one Pallas kernel per layer that is not "
                         "partitioned over a mesh; use 'scan' or 'unrolled' with sharded params")
    logits0, cache = prefill(params, tokens, attention_mask=batch.mask, method=method,
                             backend=backend, mesh=mesh)
    cache = reserve(cache, n_new, dtype=params.dtype)  # hybrid models: KV room
    filters = _decode_filters(method, params, tokens.shape[1] + n_new)
    seen = None
    if penalty is not None:
        seen = jnp.asarray(prompt_seen(batch.tokens, batch.mask, cfg.padded_vocab_size))
    # EOS ids padded with −1 (never a token) to a multiple of 4: 0 to 4 EOS ids, one program.
    eos_arr = np.full(-(-max(len(eos_ids), 1) // 4) * 4, -1, np.int32)
    eos_arr[: len(eos_ids)] = eos_ids
    inputs = LoopInputs(prng, filters, jnp.asarray(eos_arr), jnp.asarray(pad_id, i32), sampler,
                        penalty)
    return _Setup(params, batch, cache, logits0, inputs, seen, n_new,
                  _buffer_width(n_new, return_logits), resolve_backend(backend), decode_impl,
                  bool(return_logits), bool(return_logprobs))


def _run_all(s: _Setup):
    """The whole loop in one call: (tokens, logits, lengths, num_steps, logprobs)."""
    tokens, logits, lengths, steps, _, logprobs = _decode_loop(
        s.params, s.cache, s.logits0, s.inputs.key, s.inputs.filters, s.inputs.eos_ids,
        s.inputs.pad_id, sampler=s.inputs.sampler, max_new_tokens=s.n_buffer,
        backend=s.backend, return_logits=s.return_logits, return_logprobs=s.return_logprobs,
        penalty=s.inputs.penalty, seen=s.seen, limit=np.int32(s.n), decode_impl=s.decode_impl)
    return tokens, logits, lengths, steps, logprobs


def _run_sliced(s: _Setup, stops: StopStrings | None, sync_every: int):
    """Generator over token columns int32 [b]; returns (tokens, logits, lengths, steps,
    logprobs) like `_run_all`."""
    state = _decode_start(s.params, s.cache, s.logits0, s.inputs, s.seen, n=s.n_buffer,
                          return_logits=s.return_logits, return_logprobs=s.return_logprobs)
    layers = _prepare_layers(s.params, s.inputs.filters, s.decode_impl)

    def advance(state, stop_at):
        return _decode_run(s.params, layers, state, s.inputs, np.int32(stop_at),
                           backend=s.backend, decode_impl=s.decode_impl)

    state = yield from host_loop(state, advance, limit=s.n, sync_every=sync_every, stops=stops,
                                 pad_id=int(s.inputs.pad_id))
    return state.tokens, state.logits, state.lengths, state.i - 1, state.logprobs


def _finish(s: _Setup, tokens, logits, lengths, steps, logprobs):
    if s.n_buffer != s.n:  # the buffer was rounded up: keep the n asked for
        tokens = tokens[:, : s.n]
        logprobs = None if logprobs is None else logprobs[:, : s.n]
    if s.return_logits or s.return_logprobs:
        return GenerateOutput(tokens, logits, lengths, steps, logprobs)
    return in_form(tokens, lengths, s.batch.form)


def _sync_every(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"sync_every must be a positive int, got {value!r}")
    return int(value)


def generate(params: Params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop_strings: str | list[str] | None = None, tokenizer=None, attention_mask=None,
             seed: int | None = None, key=None, backend: str = "auto", method: Any = None,
             return_logits: bool = False, return_logprobs: bool = False, streamer=None,
             sync_every: int | None = None, pad_to_multiple_of: int | None = None,
             decode_impl: str = "scan", mesh=None):
    """Generates up to `max_new_tokens` tokens after each prompt (greedy at temperature 0).

    Prefill runs once over the prompts; the decode loop is one jitted `lax.while_loop` on device
    (compiled once per batch size, buffer width and sampler structure; nothing per token). A
    row stops after an EOS id or a stop string: its later ids are `pad_token_id`. The loop exits
    as soon as all rows have stopped. docs/generation.md has the details and examples.

    Args:
      params: `Params` from `load` or `init_params`.
      prompts: int [b, l]; int [l] or a list of ints (one prompt); or a list of 1-D prompts of
        any lengths (left-padded and masked here: each row gets the tokens it would get alone).
      max_new_tokens: tokens to generate per sequence (≥ 1).
      temperature: 0 for greedy, else the sampling temperature.
      top_k / top_p / min_p: sampling filters (need temperature > 0); see `sampling.py`.
      repetition_penalty: > 0 (1 = off), transformers' semantics over the prompt (its real
        tokens, not the padding) and the generated tokens; greedy too.
      eos_token_id: an id or a list of ids, any of which ends a row (None: never stop early).
      pad_token_id: id written after a row's end (default: the first EOS id, else 0; as
        transformers).
      stop_strings: a string or a list; a row ends at the first token whose decoded text
        contains one (that token kept). Needs `tokenizer`; checked on the host every
        `sync_every` steps.
      tokenizer: anything with `decode(ids) -> str` (for stop strings).
      attention_mask: [b, l] 1 for real tokens, 0 for padding (left or right) of an int
        [b, l] batch.
      seed / key: PRNG seed (int) or key (`jax.random.key` / `PRNGKey`) for sampling; not both
        (default seed 0). The draw at step i uses fold_in(key, i); seed s == key PRNGKey(s).
      backend: scan backend for the prefill ("auto", "reference", "associative", "pallas", ...).
      method: None, `LongMamba(...)` or `DeciMamba(...)` (see the module docstring).
      return_logits: also return the raw logits of every step (memory b × n × V fp32).
      return_logprobs: also return the log-probability of each chosen token (after the
        processors); with greedy and no repetition penalty it equals log_softmax(logits) over
        the real vocabulary.
      streamer: a callable called with each new token column (int for one 1-D prompt, int32
        [b] otherwise) as it is produced, or a transformers streamer (`put` / `end`, first
        given the prompt ids).
      sync_every: decode steps per device call with a streamer or stop strings (default 1 with
        a streamer, else 8): the latency / host-overhead trade.
      pad_to_multiple_of: left-pad the prompts to a multiple of this length (masked), so that
        prompts of nearby lengths share one compiled prefill. Exact for vanilla; LongMamba
        uses θ for the padded length; not with DeciMamba.
      decode_impl: "scan" (the layers under one `lax.scan`), "unrolled" (layers unrolled,
        weights split once before the loop) or "fused" (unrolled, Mamba2's conv + SSM + gate
        as one Pallas kernel per layer on the "pallas" backend, projections kept GEMMs at
        batch 1); see `longmamba_jax.generation.decode_steps`. Same results up to fp32 rounding.
      mesh: the `jax.sharding.Mesh` to run on (default: the one the weights were placed on
        with `longmamba_jax.shard`): the batch is split over its data axes (docs/sharding.md).

    Returns:
      In the prompts' form: int32 [b, n] for int [b, l]; int32 [n] for one prompt; a list of
      numpy int32 [n_r] cut at each row's end for a list of prompts. A `GenerateOutput` (the
      padded batch) when return_logits or return_logprobs.
    """
    stops = None if stop_strings is None else StopStrings(stop_strings, tokenizer)
    every = _sync_every(sync_every, 1 if streamer is not None else 8)
    if streamer is not None:
        put, end, wants_prompt = as_callback(streamer)
    s = _setup(params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
               top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
               attention_mask=attention_mask, seed=seed, key=key, backend=backend,
               method=method, return_logits=return_logits, return_logprobs=return_logprobs,
               pad_to_multiple_of=pad_to_multiple_of, decode_impl=decode_impl, mesh=mesh)
    if streamer is None and stops is None:
        return _finish(s, *_run_all(s))
    steps = _run_sliced(s, stops, every)
    if streamer is not None and wants_prompt:
        put(np.asarray(s.batch.tokens))
    while True:
        try:
            column = next(steps)
        except StopIteration as stop:
            result = stop.value
            break
        if streamer is not None:
            put(int(column[0]) if s.batch.form == "single" and not wants_prompt else column)
    if streamer is not None and end is not None:
        end()
    return _finish(s, *result)


def stream_generate(params: Params, prompts, *, max_new_tokens: int,
                    stop_strings: str | list[str] | None = None, tokenizer=None,
                    sync_every: int = 1, **options) -> Iterator:
    """Yields the generated tokens as they are produced, step by step.

    Same prompts and options as `generate` (`options`: temperature, top_k, top_p, min_p,
    repetition_penalty, eos_token_id, pad_token_id, attention_mask, seed, key, backend,
    method, pad_to_multiple_of, decode_impl). The request is checked and the prompts prefilled
    when this is called; the decode loop runs as the iterator is consumed, `sync_every` steps
    per device call.

    Yields:
      For one 1-D prompt an int per step; otherwise int32 [b] per step (the pad id in rows that
      have ended). The yielded columns, stacked, are `generate`'s tokens up to the last step
      run; iteration ends when every row has ended or after max_new_tokens steps.
    """
    stops = None if stop_strings is None else StopStrings(stop_strings, tokenizer)
    every = _sync_every(sync_every, 1)
    s = _setup(params, prompts, max_new_tokens=max_new_tokens, **options)
    steps = _run_sliced(s, stops, every)
    single = s.batch.form == "single"
    return (int(c[0]) if single else c for c in steps)


def _penalty(value):
    if value is None or value == 1.0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"repetition_penalty must be a float > 0 (1 = off), got {value!r}")
    return jnp.asarray(value, f32)


def _prng_key(seed, key):
    """A typed PRNG key (seed s, PRNGKey(s) and key(s) give the same key and one program)."""
    if seed is not None and key is not None:
        raise ValueError("pass seed= or key=, not both (seed s is key=jax.random.key(s))")
    if key is None:
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return jax.random.key(int(seed))
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return key
    else:
        raw = np.asarray(key)
        if raw.dtype == np.uint32 and raw.shape == jax.random.PRNGKey(0).shape:
            return jax.random.wrap_key_data(jnp.asarray(raw))
    raise ValueError(f"key must be one PRNG key (jax.random.key(s) or jax.random.PRNGKey(s)), "
                     f"got {getattr(key, 'dtype', type(key).__name__)} "
                     f"{getattr(key, 'shape', '')}")


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
