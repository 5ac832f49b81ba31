"""Whole-model prefill: tokens/s at each length, vanilla against LongMamba filters (timed
alternately, the overhead their median ratio − 1), and the long prompt: `prefill_chunked` of
`--long-len` tokens in `--chunk` chunks (time, peak memory, NaN check) and chunked == one-shot
at `--eq-len` tokens."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import longmamba_jax as lmj
from longmamba_evals.bench.common import finite, rel_err
from longmamba_evals.bench.model_setup import (
    model_costs,
    peak_bytes,
    program_bytes,
    random_params,
    random_tokens,
    synthetic_longmamba,
)
from longmamba_evals.bench.model_table import gib, print_rows
from longmamba_jax.model import apply_model

__all__ = ["sec_longprompt", "sec_prefill"]


def sec_prefill(args, arch: str) -> dict:
    params = random_params(arch, args.small)
    method = synthetic_longmamba(params, 256 if args.small else 2048)
    backend = lmj.resolve_backend(args.backend)
    rows = []
    for length in args.lengths:
        tokens = random_tokens(1, length, params.config.vocab_size, seed=length)
        fns = {"vanilla": lambda t=tokens: lmj.prefill(params, t, backend=args.backend),
               "longmamba": lambda t=tokens: lmj.prefill(params, t, backend=args.backend,
                                                         method=method)}
        first, times, peaks = {}, {k: [] for k in fns}, {}
        for name, fn in fns.items():  # compile both, then time them alternately
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            first[name] = time.perf_counter() - t0
            if not finite(out):
                raise FloatingPointError(f"{arch} prefill {name} at {length}: NaN/inf")
            peaks[name] = peak_bytes()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            t = statistics.median(times[name])
            kwargs = {"filters": method.filters} if name == "longmamba" else {}
            rows.append({
                "kind": "prefill", "arch": arch, "method": name, "batch": 1, "length": length,
                "median_s": t, "tokens_per_s": length / t,
                "compile_s": max(first[name] - t, 0.0), "times_s": times[name],
                "peak_bytes_after": peaks[name],
                "program_bytes": program_bytes(apply_model, params, jnp.asarray(tokens),
                                                backend=backend, last_n=1, return_cache=True,
                                                **kwargs),
            })
        v, lm = (statistics.median(times[k]) for k in ("vanilla", "longmamba"))
        rows[-1]["overhead_pct"] = 100 * (lm / v - 1)
        # spread of the vanilla runs: an overhead smaller than this is noise
        rows[-2]["spread_pct"] = 100 * (max(times["vanilla"]) / min(times["vanilla"]) - 1)
        print_rows(rows[-2:])
    return {"rows": rows, "costs": model_costs(params)}


def sec_longprompt(args) -> dict:
    params = random_params("mamba2", args.small)
    vocab = params.config.vocab_size
    out = {}
    chunk = args.chunk
    # 1. warm-up: one chunk through the chunked path (compiles the chunk program)
    warm = random_tokens(1, chunk, vocab, seed=11)
    t0 = time.perf_counter()
    jax.block_until_ready(lmj.prefill_chunked(params, warm, chunk_size=chunk,
                                              backend=args.backend))
    out["chunk_compile_and_run_s"] = time.perf_counter() - t0
    # 2. the long prompt, vanilla then LongMamba (θ for the total length in every chunk)
    long_tokens = random_tokens(1, args.long_len, vocab, seed=12)
    method = synthetic_longmamba(params, 256 if args.small else 2048)
    for name, meth in (("vanilla", None), ("longmamba", method)):
        if name == "longmamba":  # compile its chunk program outside the timing
            jax.block_until_ready(lmj.prefill_chunked(params, warm, chunk_size=chunk,
                                                      backend=args.backend, method=meth))
        t0 = time.perf_counter()
        logits, cache = jax.block_until_ready(lmj.prefill_chunked(
            params, long_tokens, chunk_size=chunk, backend=args.backend, method=meth))
        t = time.perf_counter() - t0
        out[f"long_{name}"] = {
            "length": args.long_len, "chunk": chunk, "s": t, "tokens_per_s": args.long_len / t,
            "finite": finite((logits, cache)), "peak_bytes_after": peak_bytes(),
        }
        print(f"long prompt {name}: {args.long_len:,} tokens in {t:.2f} s "
              f"({args.long_len / t:,.0f} tok/s), finite={out[f'long_{name}']['finite']}, "
              f"peak {gib(peak_bytes())}", flush=True)
    # 3. chunked == one-shot where both fit
    eq_tokens = random_tokens(1, args.eq_len, vocab, seed=13)
    for name, meth in (("vanilla", None), ("longmamba", method)):
        ref_logits, ref_cache = jax.block_until_ready(
            lmj.prefill(params, eq_tokens, backend=args.backend, method=meth))
        logits, cache = jax.block_until_ready(lmj.prefill_chunked(
            params, eq_tokens, chunk_size=chunk, backend=args.backend, method=meth))
        out[f"equal_{name}"] = {
            "length": args.eq_len, "chunk": chunk,
            "rel_err_logits": rel_err(logits, ref_logits),
            "rel_err_ssm_state": rel_err(cache.ssm, ref_cache.ssm),
            "finite": finite((logits, cache, ref_logits, ref_cache)),
            "peak_bytes_after_one_shot": peak_bytes(),
        }
        print(f"chunked vs one-shot {name} at {args.eq_len:,}: logits rel "
              f"{out[f'equal_{name}']['rel_err_logits']:.2e}, state rel "
              f"{out[f'equal_{name}']['rel_err_ssm_state']:.2e}", flush=True)
    return out
