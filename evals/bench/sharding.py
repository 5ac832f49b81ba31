"""Prefill throughput on several devices: data-parallel (the batch split), tensor-parallel (heads
and vocabulary split) and context-parallel (one prompt split along the sequence) on 1, 2, 4, 8
devices, and one very long context-parallel prefill (10M tokens by default).

    python evals/bench/sharding.py --out sharding.json                # on a multi-GPU machine
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python evals/bench/sharding.py --small --out s.json           # CPU smoke run

Random-weight models with mamba2-1.3b's and mamba-1.4b's shapes (bf16; `--small`: tiny fp32),
their decays drawn small so that states carry across context-parallel pieces.
Data parallel keeps `--dp-batch` rows per device (weak scaling: the batch grows with the
devices); tensor and context parallel keep the work fixed (strong scaling). Every row has the
median seconds of `--repeats` calls after a compiling one, tokens/s and the speed-up over one
device in the same mode; context-parallel rows also the relative errors of their last logits
and final SSM state against the one-device prefill (docs/sharding.md). Only the devices that
exist are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import finite, lengths, rel_err, write_json
from longmamba_evals.bench.model_setup import random_params, random_tokens
from longmamba_evals.bench.timing import timed

MODES = ("dp", "tp", "cp")


def _time(fn, repeats: int):
    first, times = timed(fn, repeats)
    t = statistics.median(times) if times else first
    return t, max(first - t, 0.0)


def _row(arch, mode, n, batch, length, t, compile_s, **extra):
    return {"arch": arch, "mode": mode, "devices": n, "batch": batch, "length": length,
            "median_s": t, "tokens_per_s": batch * length / t, "compile_s": compile_s, **extra}


def bench_mode(params, arch: str, mode: str, n: int, args) -> dict:
    """One (mode, device count) row."""
    vocab = params.config.vocab_size
    if mode == "cp":
        tokens = random_tokens(1, args.cp_len, vocab, seed=1)
        mesh = lmj.make_mesh(seq=n)
        fn = lambda: lmj.prefill_context_parallel(params, tokens, mesh, backend=args.backend,
                                                  chunk_size=args.cp_chunk)
        t, compile_s = _time(fn, args.repeats)
        logits, cache = fn()
        if not finite((logits, cache)):
            raise FloatingPointError(f"{arch} context-parallel prefill on {n} devices: NaN/inf")
        ref_logits, ref_cache = lmj.prefill(params, tokens, backend=args.backend)
        return _row(arch, mode, n, 1, args.cp_len, t, compile_s,
                    rel_err_logits=rel_err(logits, ref_logits),
                    rel_err_state=rel_err(cache.ssm, ref_cache.ssm))
    if mode == "dp":
        batch, mesh = args.dp_batch * n, lmj.make_mesh(data=n)
    else:
        batch, mesh = args.tp_batch, lmj.make_mesh(tensor=n)
    placed = lmj.shard(params, mesh)
    tokens = random_tokens(batch, args.length, vocab, seed=2)
    t, compile_s = _time(lambda: lmj.prefill(placed, tokens, backend=args.backend),
                         args.repeats)
    return _row(arch, mode, n, batch, args.length, t, compile_s)


def bench_long(params, arch: str, n: int, args) -> dict:
    """The `--long`-token context-parallel prefill on n devices, in rounds of `--long-chunk`
    tokens per device (one call: its time includes the compilation of its one or two programs)."""
    tokens = random_tokens(1, args.long, params.config.vocab_size, seed=3)
    mesh = lmj.make_mesh(seq=n)
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(lmj.prefill_context_parallel(
        params, tokens, mesh, backend=args.backend, chunk_size=args.long_chunk))
    first = time.perf_counter() - t0
    return {"arch": arch, "mode": "cp-long", "devices": n, "batch": 1, "length": args.long,
            "chunk_per_device": args.long_chunk, "seconds": first,
            "tokens_per_s": args.long / first, "finite": finite((logits, cache))}


def slow_decays(params, seed: int = 0):
    """`params` with every A = −exp(A_log) in [−0.02, −0.002]: random weights at init (A down
    to −16) forget a piece's state within a few tokens, which would make the context-parallel
    error check vacuous; the time is the same."""
    mixer = params.weights["layers"]["mixer"]
    a_log = mixer["A_log"]
    a = np.random.default_rng(seed).uniform(0.002, 0.02, a_log.shape)
    layers = {**params.weights["layers"],
              "mixer": {**mixer, "A_log": jnp.asarray(np.log(a), a_log.dtype)}}
    return dataclasses.replace(params, weights={**params.weights, "layers": layers})


def run(args) -> dict:
    available = jax.device_count()
    counts = [n for n in args.devices if n <= available]
    if len(counts) < len(args.devices):
        print(f"only {available} devices: skipping {sorted(set(args.devices) - set(counts))}",
              file=sys.stderr)
    out = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
           "args": vars(args), "rows": []}
    for arch in args.archs:
        params = slow_decays(random_params(arch, args.small))
        for mode in args.modes:
            base = None
            for n in counts:
                try:
                    row = bench_mode(params, arch, mode, n, args)
                except ValueError as e:  # a split the shapes do not allow
                    print(f"{arch} {mode} x{n}: skipped: {e}", file=sys.stderr)
                    continue
                base = row["tokens_per_s"] if n == 1 else base
                if base:
                    row["speedup"] = row["tokens_per_s"] / base
                out["rows"].append(row)
                print(f"{arch} {mode} x{n}: batch {row['batch']} × {row['length']} "
                      f"{row['median_s'] * 1e3:10.2f} ms {row['tokens_per_s']:12.0f} tok/s"
                      f" ×{row.get('speedup', float('nan')):.2f}"
                      + (f" rel.err logits {row['rel_err_logits']:.1e} state "
                         f"{row['rel_err_state']:.1e}" if mode == "cp" else ""),
                      flush=True)
                write_json(args.out, out)
        if args.long and counts:
            row = bench_long(params, arch, max(counts), args)
            out["rows"].append(row)
            print(f"{arch} context-parallel {row['length']} tokens on {row['devices']} devices: "
                  f"{row['seconds']:.1f} s, {row['tokens_per_s']:.0f} tok/s", flush=True)
            write_json(args.out, out)
        del params
    write_json(args.out, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python evals/bench/sharding.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="mamba2,mamba1", type=lambda s: s.split(","))
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    p.add_argument("--devices", default="1,2,4,8",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--length", type=lengths, default=None,
                   help="prompt length of dp and tp (default 8K; --small 256)")
    p.add_argument("--dp-batch", type=int, default=1, help="rows per device (dp)")
    p.add_argument("--tp-batch", type=int, default=None, help="rows (tp; default 8, small 2)")
    p.add_argument("--cp-len", type=lengths, default=None,
                   help="prompt length of cp (default 128K; --small 512)")
    p.add_argument("--cp-chunk", type=int, default=None,
                   help="tokens per device per round (cp; default: all in one round)")
    p.add_argument("--long", type=lengths, default=None,
                   help="tokens of the long cp prefill (default 10,000,000; --small 4096; 0 "
                   "skips)")
    p.add_argument("--long-chunk", type=int, default=None,
                   help="tokens per device per round of the long prefill (default 64K; small 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    args = p.parse_args(argv)
    one = lambda v: v[0] if isinstance(v, list) else v
    defaults = dict(length=(256, 8192), tp_batch=(2, 8), cp_len=(512, 128 * 1024),
                    long=(4096, 10_000_000), long_chunk=(256, 64 * 1024))
    for name, (small, full) in defaults.items():
        value = getattr(args, name)
        setattr(args, name, (small if args.small else full) if value is None else one(value))
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose among {MODES}")
    return run(args)


if __name__ == "__main__":
    main()
