"""Timing helpers of the benchmarks, and the device's ceilings (copy bandwidth, matmul rate).

`time_fn` amortises launches (batches of back-to-back asynchronous calls, one sync a batch), for
kernels; `timed` waits for every call, for whole-model prefill and decode loops; `time_paired`
interleaves a few calls round by round, for ratios between them. `sync` is
`jax.block_until_ready` for JAX and e.g. `lambda _: torch.cuda.synchronize()` for torch, so the
official kernels are timed by the same loops.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

__all__ = ["copy_bandwidth", "matmul_rate", "paired_ratio", "time_fn", "time_paired", "timed"]


def time_fn(fn, *args, reps=20, batches=5, min_batch_s=0.05, sync=jax.block_until_ready):
    """Median seconds per call: `batches` batches of `reps` async launches, one sync each.

    Returns:
        (median seconds per call, [seconds per call of each batch]).
    """
    sync(fn(*args))  # compile (or autotune) + warm up
    sync(fn(*args))
    t0 = time.perf_counter()
    sync(fn(*args))
    one = time.perf_counter() - t0
    reps = max(1, min(reps, int(min_batch_s / max(one, 1e-6)) + 1))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        sync(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times), times


def time_paired(calls, rounds=15, min_batch_s=0.02, sync=jax.block_until_ready):
    """Interleaved timing of a few calls, for ratios between them (e.g. a filter's overhead).

    `calls` is {name: (fn, args)}. Each round times one batch of each call back to back, in an
    order that rotates from round to round, so clock ramps and other drift fall on every call
    alike; a batch holds enough launches for `min_batch_s`. Returns ({name: median seconds per
    call}, {name: per-round seconds}); ratios should be taken round by round (`paired_ratio`).
    """
    names = list(calls)
    reps = {}
    for name, (fn, args) in calls.items():
        sync(fn(*args))  # compile + warm up
        sync(fn(*args))
        t0 = time.perf_counter()
        sync(fn(*args))
        reps[name] = max(1, int(min_batch_s / max(time.perf_counter() - t0, 1e-6)) + 1)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, args = calls[name]
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                out = fn(*args)
            sync(out)
            per_round[name].append((time.perf_counter() - t0) / reps[name])
    return {n: statistics.median(v) for n, v in per_round.items()}, per_round


def paired_ratio(per_round, num, den):
    """Median over rounds of per_round[num] / per_round[den]."""
    return statistics.median(a / b for a, b in zip(per_round[num], per_round[den], strict=True))


def timed(fn, repeats: int, sync=jax.block_until_ready):
    """(first-call seconds, [seconds of each of `repeats` more calls]) of fn(), each call waited
    for; the first call compiles, so first − median is the compile time."""
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second of `a + 1` over an fp32 array of `nbytes` (median of
    `time_fn`), the memory floors' denominator."""
    a = jnp.arange(nbytes // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t, _ = time_fn(f, a, reps=10)
    return 2 * a.nbytes / t


def matmul_rate(n: int, dtype=jnp.bfloat16) -> float:
    """FLOP/s of an [n, n] @ [n, n] matmul of random `dtype` matrices (median of `time_fn`)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    y = jax.random.normal(jax.random.PRNGKey(2), (n, n), dtype)
    mm = jax.jit(lambda p, q: p @ q)
    t, _ = time_fn(mm, x, y, reps=10)
    return 2 * n**3 / t
