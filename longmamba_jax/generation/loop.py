"""The decode loop: token 0 from the prefill logits, then recurrent steps in a `lax.while_loop`.

    tok_0 = pick(logits_prefill, 0);   for i ≥ 1, while i < stop_at and a row is running:
        (logits_i, cache) = step(cache, tok_{i−1});   tok_i = pick(logits_i, i)
    pick(x, i) = draw(sampler.process(penalty(mask_padded_vocab(x), seen)), fold_in(key, i))

Everything a step carries is a `DecodeState` (tokens [b, n], lengths [b], done [b], the cache,
and the optional per-step outputs), so the loop can run in one call to the end (`decode_all`,
what `generate` uses) or resume in slices of steps (`decode_start` + `decode_run`, what
streaming and stop strings use; docs/generation.md, "Streaming"). Options that are off are
None in the state / inputs and add nothing to the compiled step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from longmamba_jax.generation.decode_steps import (
    prepare_fused,
    split_layers,
    step_fused,
    step_unrolled,
)
from longmamba_jax.generation.sampling import mask_padded_vocab, repetition_penalty
from longmamba_jax.mixers import ScanBackend
from longmamba_jax.model import Cache, LayerFilters, Params, apply_model

f32 = jnp.float32
i32 = jnp.int32


class DecodeState(NamedTuple):
    """The loop's carry (a pytree; None fields are options that are off).

    i: int32 [] tokens produced so far (the next step writes column i).
    tok: int32 [b] each row's last token.  cache: the `Cache` after it.
    done: bool [b] rows that emitted an EOS (or, host side, a stop string).
    tokens: int32 [b, n] generated ids, `pad_id` after a row's end.
    lengths: int32 [b] tokens per row, its EOS included.
    logits: fp32 [b, n, V] raw logits of each step, or None.
    logprobs: fp32 [b, n] log-probability of each chosen id under the processed logits, or None.
    seen: bool [b, V] ids in the prompt or generated so far (repetition penalty), or None.
    """

    i: Any
    tok: Any
    cache: Cache
    done: Any
    tokens: Any
    lengths: Any
    logits: Any
    logprobs: Any
    seen: Any


class LoopInputs(NamedTuple):
    """What every step reads and nothing changes (a pytree).

    key: PRNG key (raw uint32 [2] or typed).  filters: LongMamba decode filters or None.
    eos_ids: int32 [k] (k may be 0).  pad_id: int32 [].
    sampler: `Greedy()` / `Sampling(...)`.  penalty: fp32 [] repetition penalty, or None.
    """

    key: Any
    filters: LayerFilters | None
    eos_ids: Any
    pad_id: Any
    sampler: Any
    penalty: Any


def step_body(params: Params, cache: Cache, token, filters: LayerFilters | None, backend,
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


def prepare_layers(params: Params, filters, impl: str):
    """The per-layer weights the unrolled / fused steps read (None for impl="scan")."""
    if impl == "unrolled":
        return split_layers(params)
    if impl == "fused":
        return prepare_fused(params, filters)
    return None


def _pick(logits, i, seen, inp: LoopInputs, vocab: int, want_logprob: bool):
    """(ids int32 [b], logprobs fp32 [b] or None) chosen from raw logits [b, V] at step i."""
    x = mask_padded_vocab(logits.astype(f32), vocab)
    if inp.penalty is not None:
        x = repetition_penalty(x, seen, inp.penalty)
    x = inp.sampler.process(x)
    tok = inp.sampler.draw(x, jax.random.fold_in(inp.key, i))
    logprob = None
    if want_logprob:
        logprob = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], 1)[:, 0]
    return tok, logprob


def _is_eos(tok, eos_ids):
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)  # [b]


def _mark_seen(seen, tok):
    return seen.at[jnp.arange(tok.shape[0]), tok].set(True)


def decode_start(params: Params, cache: Cache, logits0, inp: LoopInputs, seen, *, n: int,
                 return_logits: bool, return_logprobs: bool) -> DecodeState:
    """Token 0 from the prefill logits fp32 [b, V]; the state before the first step.

    seen: bool [b, V] ids of each prompt (when the repetition penalty is on), else None.
    """
    batch, v_pad = logits0.shape
    tok, logprob = _pick(logits0, 0, seen, inp, params.config.vocab_size, return_logprobs)
    return DecodeState(
        i=jnp.asarray(1, i32),
        tok=tok,
        cache=cache,
        done=_is_eos(tok, inp.eos_ids),
        tokens=jnp.full((batch, n), inp.pad_id, i32).at[:, 0].set(tok),
        lengths=jnp.ones((batch,), i32),
        logits=jnp.zeros((batch, n, v_pad), f32).at[:, 0].set(logits0) if return_logits
        else None,
        logprobs=jnp.zeros((batch, n), f32).at[:, 0].set(logprob) if return_logprobs else None,
        seen=None if seen is None else _mark_seen(seen, tok),
    )


def decode_run(params: Params, layers, state: DecodeState, inp: LoopInputs, stop_at, *,
               backend: ScanBackend, decode_impl: str = "scan") -> DecodeState:
    """Runs steps until `stop_at` (int32 [], ≤ n) tokens exist or every row is done."""
    vocab = params.config.vocab_size

    def cond(s: DecodeState):
        return (s.i < stop_at) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = step_body(params, s.cache, s.tok, inp.filters, backend, layers,
                                  decode_impl)  # [b, V]
        nxt, logprob = _pick(logits, s.i, s.seen, inp, vocab, s.logprobs is not None)
        nxt = jnp.where(s.done, inp.pad_id, nxt)
        out = s._replace(
            i=s.i + 1, tok=nxt, cache=cache, done=s.done | _is_eos(nxt, inp.eos_ids),
            tokens=jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.i)),
            lengths=s.lengths + (~s.done).astype(i32),
        )
        if s.logits is not None:
            out = out._replace(logits=jax.lax.dynamic_update_slice(
                s.logits, logits[:, None], (0, s.i, 0)))
        if s.logprobs is not None:
            logprob = jnp.where(s.done, 0.0, logprob)
            out = out._replace(logprobs=jax.lax.dynamic_update_slice(
                s.logprobs, logprob[:, None], (0, s.i)))
        if s.seen is not None:
            out = out._replace(seen=_mark_seen(s.seen, nxt))
        return out

    return jax.lax.while_loop(cond, body, state)


def decode_all(params: Params, cache: Cache, logits0, inp: LoopInputs, seen, limit, *, n: int,
               backend: ScanBackend, return_logits: bool, return_logprobs: bool,
               decode_impl: str = "scan") -> DecodeState:
    """`decode_start` then `decode_run` to `limit` tokens (int32 [], ≤ n): the whole
    generation in one program."""
    state = decode_start(params, cache, logits0, inp, seen, n=n, return_logits=return_logits,
                         return_logprobs=return_logprobs)
    layers = prepare_layers(params, inp.filters, decode_impl)  # once, outside the loop
    return decode_run(params, layers, state, inp, limit, backend=backend,
                      decode_impl=decode_impl)
