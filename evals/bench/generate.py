"""Generation throughput of a random-weight model with mamba2-1.3b's shapes (or mamba-1.4b's
with `--arch mamba1`), no checkpoint needed.

Measured, each after an untimed first call whose extra time is reported as compile time
(first-call time − median timed time):
- prefill tokens/s = b·L / t for `longmamba_jax.prefill` at each prompt length L (batch 1);
- decode tokens/s = b·steps / t for the on-device decode loop of `generate` (greedy, no EOS, so
  every step runs) after a `--prompt-len` prompt, per batch size; also the step latency in ms;
- end-to-end `generate` wall time (prefill + decode) and a Python loop of `decode_step` calls
  (what a user-written loop costs per token, dispatch included).
Every timed call is waited for (`block_until_ready`). Prints a markdown table, saves JSON.

    python evals/bench/generate.py --out generate.json          # on a GPU
    python evals/bench/generate.py --small --out generate_small.json   # quick CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import write_json
from longmamba_evals.bench.model_setup import CONFIGS, DTYPES, model_config, random_tokens
from longmamba_evals.bench.timing import timed
from longmamba_evals.tasks.runner import device_name
from longmamba_jax.generation.generate import _decode_loop
from longmamba_jax.generation.sampling import Greedy


def bench_prefill(params, length: int, *, batch: int, backend: str, repeats: int) -> dict:
    tokens = random_tokens(batch, length, params.config.vocab_size)
    first, times = timed(lambda: lmj.prefill(params, tokens, backend=backend), repeats)
    t = statistics.median(times)
    return {"kind": "prefill", "batch": batch, "length": length, "median_s": t,
            "tokens_per_s": batch * length / t, "compile_s": max(first - t, 0.0),
            "times_s": times}


def bench_decode(params, *, batch: int, prompt_len: int, new_tokens: int, backend: str,
                 repeats: int, step_loop: int) -> dict:
    tokens = random_tokens(batch, prompt_len, params.config.vocab_size, seed=batch)
    logits0, cache = jax.block_until_ready(lmj.prefill(params, tokens, backend=backend))
    scan_backend = lmj.resolve_backend(backend)
    loop = functools.partial(
        _decode_loop, params, logits0=logits0, key=jax.random.PRNGKey(0), filters=None,
        eos_ids=jnp.zeros((0,), jnp.int32), pad_id=jnp.int32(0), sampler=Greedy(),
        max_new_tokens=new_tokens, backend=scan_backend, return_logits=False,
    )
    # The loop donates its cache: give every call its own copy (made outside the timing).
    copies = [jax.tree.map(jnp.copy, cache) for _ in range(repeats + 1)]
    jax.block_until_ready(copies)
    first, times = timed(lambda: loop(copies.pop())[:4], repeats)
    t = statistics.median(times)
    steps = new_tokens - 1  # token 0 comes from the prefill logits
    out = {"kind": "decode", "batch": batch, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "median_s": t, "tokens_per_s": batch * steps / t,
           "step_ms": 1e3 * t / steps, "compile_s": max(first - t, 0.0), "times_s": times}

    gen_first, gen_times = timed(
        lambda: lmj.generate(params, tokens, max_new_tokens=new_tokens, backend=backend), 1)
    out["generate_s"] = gen_times[0]

    if step_loop:
        token = jnp.zeros((batch,), jnp.int32)
        c = jax.tree.map(jnp.copy, cache)
        _, c = jax.block_until_ready(lmj.decode_step(params, c, token, backend=backend))
        t0 = time.perf_counter()
        for _ in range(step_loop):
            logits, c = lmj.decode_step(params, c, token, backend=backend)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        jax.block_until_ready(token)
        out["python_loop_step_ms"] = 1e3 * (time.perf_counter() - t0) / step_loop
    return out


def _table(rows: list[dict]) -> str:
    cols = ["what", "batch", "length", "tokens/s", "median ms", "step ms", "compile s",
            "generate s", "py-loop step ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def opt(r, key, fmt):
        return format(r[key], fmt) if key in r else ""

    for r in rows:
        length = r["length"] if r["kind"] == "prefill" else (
            f"{r['prompt_len']} + {r['new_tokens']}")
        cells = [r["kind"], r["batch"], length, f"{r['tokens_per_s']:,.0f}",
                 f"{1e3 * r['median_s']:.1f}", opt(r, "step_ms", ".2f"),
                 f"{r['compile_s']:.1f}", opt(r, "generate_s", ".3f"),
                 opt(r, "python_loop_step_ms", ".2f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(CONFIGS), default="mamba2")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", choices=lmj.BACKENDS)
    p.add_argument("--prefill-lengths", default="4096,16384",
                   help="comma-separated prompt lengths for the prefill measurement")
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per decode measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-loop", type=int, default=32,
                   help="Python-loop decode_step calls to time (0: skip)")
    p.add_argument("--small", action="store_true",
                   help="tiny model and short lengths: a quick CPU smoke run")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    config = model_config(args.arch, args.small)
    if args.small:
        prefill_lengths, batches = [128, 256], [1, 2]
        prompt_len, new_tokens, dtype = 64, 16, jnp.float32
    else:
        prefill_lengths = [int(x) for x in args.prefill_lengths.split(",") if x]
        batches = [int(x) for x in args.decode_batches.split(",") if x]
        prompt_len, new_tokens, dtype = args.prompt_len, args.new_tokens, DTYPES[args.dtype]
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2, got {new_tokens}")

    t0 = time.perf_counter()
    params = jax.jit(lambda: lmj.init_params(config, 0, dtype))()
    jax.block_until_ready(params.weights)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params.weights))
    dtype_name = "fp32" if args.small else args.dtype
    print(f"{args.arch}: {n_params / 1e6:,.1f}M parameters ({dtype_name}) on {device_name()}, "
          f"backend {args.backend}; init {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    for length in prefill_lengths:
        rows.append(bench_prefill(params, length, batch=args.prefill_batch,
                                  backend=args.backend, repeats=args.repeats))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    for batch in batches:
        rows.append(bench_decode(params, batch=batch, prompt_len=prompt_len,
                                 new_tokens=new_tokens, backend=args.backend,
                                 repeats=args.repeats, step_loop=args.step_loop))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)

    print()
    print(_table(rows))
    result = {
        "device": device_name(),
        "jax": jax.__version__,
        "longmamba_jax": lmj.__version__,
        "python": platform.python_version(),
        "arch": args.arch,
        "config": config.to_dict(),
        "n_params": n_params,
        "dtype": dtype_name,
        "backend": args.backend,
        "resolved_backend": str(lmj.resolve_backend(args.backend)),
        "small": args.small,
        "results": rows,
    }
    if args.out:
        write_json(args.out, result, indent=2)
        print(f"\nsaved {args.out}")
    return result


if __name__ == "__main__":
    main()
