"""Speed of the scan kernels (issue 6, item 4): Pallas kernel vs the XLA/jnp fallback vs the
memory floor (fewest bytes read + written / measured device copy bandwidth).

    python -m longmamba_evals.bench_scan --out scan.json            # on the GPU machine
    python evals/bench_scan.py --quick --interpret                  # smoke run on CPU

Shapes: one mamba2-1.3b layer for SSD (h=64, p=64, n=128, g=1, bf16 x/B/C, fp32 Δ, batch 1,
l = 4K, 16K, 64K, 256K) and one mamba-1.4b layer for the selective scan (e=4096, n=16). The
filtered kernel runs with half the channels global and a threshold at Δ's median, to measure the
cost of the fused filter. Times are medians over repeated batches of back-to-back launches
(asynchronous dispatch, one sync per batch), after a warm-up that compiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_kernels.selective_scan_associative import selective_scan_associative
from longmamba_kernels.selective_scan_pallas import (
    SelectiveScanPallasConfig,
    selective_scan_pallas,
)
from longmamba_kernels.ssd_chunked import ssd_chunked
from longmamba_kernels.ssd_pallas import SSDPallasConfig, ssd_pallas

K = 1024


def time_fn(fn, *args, reps=20, batches=5, min_batch_s=0.05):
    """Median seconds per call: `batches` batches of `reps` async launches, one sync each."""
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    reps = max(1, min(reps, int(min_batch_s / max(one, 1e-6)) + 1))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times), times


def copy_bandwidth(nbytes=2 * K**3):
    """Bytes read + written per second of a large device-to-device elementwise copy."""
    a = jnp.arange(nbytes // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t, _ = time_fn(f, a, reps=10)
    return 2 * a.nbytes / t


def ssd_inputs(length, h=64, p=64, n=128, g=1, b=1, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (b, length, h, p), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, length, h)) - 2.0)
    A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=0.0, maxval=2.7))
    B = jax.random.normal(k[3], (b, length, g, n), jnp.bfloat16)
    C = jax.random.normal(k[4], (b, length, g, n), jnp.bfloat16)
    D = jax.random.normal(k[5], (h,))
    thr = jnp.where(jnp.arange(h) % 2 == 0, jnp.median(dt), -jnp.inf).astype(jnp.float32)
    return (x, dt, A, B, C, D), thr


def ss_inputs(length, e=4096, n=16, b=1, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (b, length, e), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, length, e)) - 2.0)
    A = -jnp.exp(jax.random.uniform(k[2], (e, n), minval=0.0, maxval=2.7))
    B = jax.random.normal(k[3], (b, length, n), jnp.bfloat16)
    C = jax.random.normal(k[4], (b, length, n), jnp.bfloat16)
    D = jax.random.normal(k[5], (e,))
    thr = jnp.where(jnp.arange(e) % 2 == 0, jnp.median(dt), -jnp.inf).astype(jnp.float32)
    return (x, dt, A, B, C, D), thr


def nbytes(*arrays):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _measure(op, shape_fields, kernel, kernel_f, fallback, args, thr, length, bw,
             fallback_max_len, rows):
    """Times one op with and without the filter (and the jnp fallback when short enough) and
    appends a row: kernel vs floor (each input read once, each output written once)."""
    x, dt, A, B, C, D = args
    y, state = kernel(*args)
    floor_bytes = nbytes(x, dt, B, C) + nbytes(y, state)
    t_k, _ = time_fn(kernel, *args)
    t_f, _ = time_fn(kernel_f, *args, thr)
    y_f, _ = kernel_f(*args, thr)
    row = dict(
        op=op, length=length, **shape_fields, dtype="bfloat16",
        kernel_ms=t_k * 1e3, kernel_filtered_ms=t_f * 1e3,
        filter_overhead_pct=(t_f / t_k - 1) * 100,
        floor_ms=floor_bytes / bw * 1e3, floor_bytes=floor_bytes,
        nan_free=bool(jnp.isfinite(y).all() and jnp.isfinite(y_f).all()),
    )
    if length <= fallback_max_len:
        t_x, _ = time_fn(fallback, *args, reps=3, batches=3)
        y_x, s_x = fallback(*args)
        row.update(fallback_ms=t_x * 1e3, rel_err_y_vs_fallback=rel_err(y, y_x),
                   rel_err_state_vs_fallback=rel_err(state, s_x))
    rows.append(row)
    print_row(row)


def bench_ssd(lengths, bw, interpret, config, fallback_max_len, rows):
    kernel = jax.jit(lambda *a: ssd_pallas(*a, interpret=interpret, config=config))
    kernel_f = jax.jit(
        lambda *a: ssd_pallas(*a[:6], threshold=a[6], interpret=interpret, config=config)
    )
    fallback = jax.jit(lambda *a: ssd_chunked(*a, chunk_size=256))
    for length in lengths:
        args, thr = ssd_inputs(length)
        _measure("ssd", dict(h=64, p=64, n=128, g=1), kernel, kernel_f, fallback, args, thr,
                 length, bw, fallback_max_len, rows)
        del args


def bench_ss(lengths, bw, interpret, config, fallback_max_len, rows):
    kernel = jax.jit(lambda *a: selective_scan_pallas(*a, interpret=interpret, config=config))
    kernel_f = jax.jit(
        lambda *a: selective_scan_pallas(
            *a[:6], threshold=a[6], interpret=interpret, config=config
        )
    )
    fallback = jax.jit(lambda *a: selective_scan_associative(*a))
    for length in lengths:
        args, thr = ss_inputs(length)
        _measure("selective_scan", dict(e=4096, n=16), kernel, kernel_f, fallback, args, thr,
                 length, bw, fallback_max_len, rows)
        del args


def print_row(r):
    fb = f"{r['fallback_ms']:9.3f}" if "fallback_ms" in r else "        -"
    err = f"{r['rel_err_y_vs_fallback']:.1e}" if "rel_err_y_vs_fallback" in r else "      -"
    print(
        f"{r['op']:>15} {r['length']:>8} | kernel {r['kernel_ms']:8.3f} ms | filtered "
        f"{r['kernel_filtered_ms']:8.3f} ({r['filter_overhead_pct']:+5.1f}%) | fallback {fb} | "
        f"floor {r['floor_ms']:7.3f} | x floor {r['kernel_ms'] / r['floor_ms']:5.2f} | "
        f"err {err} | nan-free {r['nan_free']}",
        flush=True,
    )


SSD_SWEEP = [  # (chunk, block_p, num_warps, num_stages, precompute_cb)
    (64, 32, 4, 3, True), (64, 32, 4, 4, True), (64, 32, 4, 3, False), (32, 32, 4, 3, True),
    (64, 64, 4, 3, True), (64, 32, 8, 3, True),
]
SS_SWEEP = [  # (block_e, block_t, num_warps, num_stages)
    (8, 16, 1, 2), (8, 32, 1, 2), (16, 16, 2, 2), (4, 16, 1, 2), (8, 16, 1, 3), (32, 16, 4, 2),
]


def _sweep_one(name, length, c, run, args, thr, rows):
    try:
        plain = jax.jit(lambda *a: run(*a, config=c))
        filt = jax.jit(lambda *a: run(*a[:6], threshold=a[6], config=c))
        t_p, _ = time_fn(plain, *args)
        t_f, _ = time_fn(filt, *args, thr)
        print(f"sweep {name} l={length} {c}: {t_p * 1e3:.3f} ms, filtered {t_f * 1e3:.3f} ms",
              flush=True)
        rows.append(dict(op=f"sweep_{name}", length=length, config=str(c), ms=t_p * 1e3,
                         filtered_ms=t_f * 1e3))
    except Exception as err:  # a config that does not compile is reported, not fatal
        print(f"sweep {name} {c}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)


def sweep(length, rows):
    """Times each block-size candidate on one length, unfiltered and filtered."""
    args, thr = ssd_inputs(length)
    for chunk, block_p, warps, stages, pre in SSD_SWEEP:
        c = SSDPallasConfig(chunk=chunk, block_p=block_p, num_warps=warps, num_stages=stages,
                            precompute_cb=pre)
        _sweep_one("ssd", length, c, ssd_pallas, args, thr, rows)
    del args
    args, thr = ss_inputs(length)
    for block_e, block_t, warps, stages in SS_SWEEP:
        c = SelectiveScanPallasConfig(block_e=block_e, block_t=block_t, num_warps=warps,
                                      num_stages=stages)
        _sweep_one("selective_scan", length, c, selective_scan_pallas, args, thr, rows)


def parse_lengths(text):
    return [int(float(v[:-1]) * K) if v.endswith("K") else int(v) for v in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--ssd-lengths", default="4K,16K,64K,256K")
    ap.add_argument("--ss-lengths", default="4K,16K,64K")
    ap.add_argument("--fallback-max-len", type=int, default=64 * K,
                    help="time the jnp fallback only up to this length (it is slow)")
    ap.add_argument("--million", action="store_true",
                    help="also run one SSD layer on 1M tokens (filtered) and check for NaN")
    ap.add_argument("--sweep", type=int, default=0, metavar="L",
                    help="first time the block-size candidates at length L")
    ap.add_argument("--ssd-config", default="",
                    help="SSDPallasConfig fields, e.g. chunk=64,block_p=32")
    ap.add_argument("--ss-config", default="", help="SelectiveScanPallasConfig fields")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    ap.add_argument("--quick", action="store_true", help="tiny lengths (smoke test)")
    args = ap.parse_args(argv)

    def cfg(cls, text):
        kw = dict(kv.split("=") for kv in text.split(",") if kv)
        conv = lambda v: v == "True" if v in ("True", "False") else int(v)
        return cls(**{k: conv(v) for k, v in kw.items()})

    ssd_cfg = cfg(SSDPallasConfig, args.ssd_config)
    ss_cfg = cfg(SelectiveScanPallasConfig, args.ss_config)
    if args.quick:
        args.ssd_lengths, args.ss_lengths = "256", "64"
    dev = jax.devices()[0]
    bw = copy_bandwidth(2 * K**3 if dev.platform == "gpu" else 64 * K**2)
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")
    print(f"ssd config {ssd_cfg}; selective-scan config {ss_cfg}", flush=True)
    rows = []
    if args.sweep:
        sweep(args.sweep, rows)
    bench_ssd(parse_lengths(args.ssd_lengths), bw, args.interpret, ssd_cfg,
              args.fallback_max_len, rows)
    bench_ss(parse_lengths(args.ss_lengths), bw, args.interpret, ss_cfg,
             args.fallback_max_len, rows)
    if args.million:
        length = 1024 * K
        (x, dt, A, B, C, D), thr = ssd_inputs(length)
        f = jax.jit(lambda *a, thr: ssd_pallas(*a, threshold=thr, config=ssd_cfg))
        t, _ = time_fn(lambda *a: f(*a, thr=thr), x, dt, A, B, C, D, reps=2, batches=3)
        y, s = f(x, dt, A, B, C, D, thr=thr)
        ok = bool(jnp.isfinite(y).all() and jnp.isfinite(s).all())
        rows.append(dict(op="ssd_1M_filtered", length=length, kernel_filtered_ms=t * 1e3,
                         nan_free=ok))
        print(f"ssd 1M tokens, filtered: {t * 1e3:.2f} ms, nan-free {ok}", flush=True)
    result = dict(
        device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
        python=platform.python_version(), copy_bandwidth_bytes_per_s=bw,
        ssd_config=str(ssd_cfg), selective_scan_config=str(ss_cfg),
        command=" ".join(sys.argv), rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
