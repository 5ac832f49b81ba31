"""Speed of one layer's scan: the Pallas kernels against the jnp fallback, the official
mamba_ssm kernels and the memory floor (fewest bytes read + written / measured copy bandwidth).

    python evals/bench/scan.py --out scan.json --million       # on a GPU
    python evals/bench/scan.py --quick --interpret              # smoke run on CPU

Shapes: one mamba2-1.3b SSD layer (h=64, p=64, n=128, g=1, bf16 x/B/C, fp32 Δ, batch 1;
l = 4K, 16K, 64K, 256K) and one mamba-1.4b selective-scan layer (e=4096, n=16; 4K, 16K, 64K).
Each SSD row also times the official Triton SSD (`mamba_chunk_scan_combined`, chunk 256) and
each selective-scan row the official CUDA `selective_scan_fn`, on the same inputs (DLPack), by
the same loop, when the sources are in `--official-src` (see `official.py`); otherwise the
column is skipped with the reason. The filtered kernel runs with half the channels global and
the threshold at Δ's median. Times are medians of batches of back-to-back launches
(`timing.time_fn`); the filter's overhead (`filter_overhead_pct`) is the median per-round ratio
of interleaved rounds (`timing.time_paired`), `filter_overhead_seq_pct` the ratio of two medians
timed one after the other. `--sweep` first times block-size candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp

from longmamba_evals.bench.common import K, lengths, nbytes, parse_fields, rel_err, write_json
from longmamba_evals.bench.official import OfficialScan
from longmamba_evals.bench.timing import copy_bandwidth, paired_ratio, time_fn, time_paired
from longmamba_kernels.selective_scan import default_config, selective_scan_pallas
from longmamba_kernels.selective_scan.associative import selective_scan_associative
from longmamba_kernels.selective_scan.pallas_mosaic import SelectiveScanMosaicConfig
from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig
from longmamba_kernels.ssd.chunked import ssd_chunked
from longmamba_kernels.ssd.pallas_triton import (
    SSDPallasConfig,
    _segment_initial_states,
    ssd_pallas,
    ssd_segments,
)


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
    # Δ is bf16-exact: the official CUDA kernel takes it in the input dtype (OfficialScan.run)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, length, e)) - 2.0)
    dt = dt.astype(jnp.bfloat16).astype(jnp.float32)
    A = -jnp.exp(jax.random.uniform(k[2], (e, n), minval=0.0, maxval=2.7))
    B = jax.random.normal(k[3], (b, length, n), jnp.bfloat16)
    C = jax.random.normal(k[4], (b, length, n), jnp.bfloat16)
    D = jax.random.normal(k[5], (e,))
    thr = jnp.where(jnp.arange(e) % 2 == 0, jnp.median(dt), -jnp.inf).astype(jnp.float32)
    return (x, dt, A, B, C, D), thr


def _measure(op, shape_fields, kernel, kernel_f, fallback, args, thr, length, bw,
             fallback_max_len, rows, official=None, variants=None):
    """Times one op with and without the filter (and the jnp fallback when short enough, the
    official kernel when given, and each of `variants`, {row key: function of the args}) and
    appends a row: kernel vs floor (each input read once, each output written once)."""
    x, dt, A, B, C, D = args
    extra = {}
    if official is not None and official.fn is not None:
        try:
            t_o, t_db, y_o, s_o = official.run(args)
            extra.update(official_ms=t_o, official_do_bench_ms=t_db)
        except Exception as err:  # reported in the row, never fatal to our numbers
            extra.update(official_error=f"{type(err).__name__}: {str(err)[:300]}")
            y_o = None
    elif official is not None:
        extra.update(official_skipped=official.reason)
    y, state = kernel(*args)
    if extra.get("official_ms") is not None and length <= 64 * K:
        extra.update(rel_err_y_vs_official=official.rel_err(y, y_o),
                     rel_err_state_vs_official=official.rel_err(state, s_o))
    if official is not None and official.fn is not None:
        y_o = s_o = None
        official.torch.cuda.empty_cache()
    floor_bytes = nbytes(x, dt, B, C) + nbytes(y, state)
    t_k, _ = time_fn(kernel, *args)
    t_f, _ = time_fn(kernel_f, *args, thr)
    y_f, _ = kernel_f(*args, thr)
    # The overhead is a ratio of two ~0.1 ms calls at 4K: timed one after the other (above),
    # drift between them reads as several percent. Interleaved rounds take it round by round;
    # "no-drop" is the filtered call with a -inf threshold (same compiled code, no token
    # dropped), which separates the cost of dropping tokens from the threshold's being an input.
    _, per_round = time_paired({
        "plain": (kernel, args), "filtered": (kernel_f, (*args, thr)),
        "no_drop": (kernel_f, (*args, jnp.full_like(thr, -jnp.inf))),
    })
    extra.update(
        filter_overhead_paired_pct=(paired_ratio(per_round, "filtered", "plain") - 1) * 100,
        filter_drop_vs_no_drop_pct=(paired_ratio(per_round, "filtered", "no_drop") - 1) * 100,
        paired_ms={k: [t * 1e3 for t in v] for k, v in per_round.items()},
    )
    for key, fn in (variants or {}).items():
        extra[key] = time_fn(fn, *args)[0] * 1e3
    row = dict(
        op=op, length=length, **shape_fields, dtype="bfloat16",
        kernel_ms=t_k * 1e3, kernel_filtered_ms=t_f * 1e3,
        filter_overhead_seq_pct=(t_f / t_k - 1) * 100,
        filter_overhead_pct=extra.pop("filter_overhead_paired_pct"),
        floor_ms=floor_bytes / bw * 1e3, floor_bytes=floor_bytes,
        nan_free=bool(jnp.isfinite(y).all() and jnp.isfinite(y_f).all()), **extra,
    )
    if length <= fallback_max_len:
        t_x, _ = time_fn(fallback, *args, reps=3, batches=3)
        y_x, s_x = fallback(*args)
        row.update(fallback_ms=t_x * 1e3, rel_err_y_vs_fallback=rel_err(y, y_x),
                   rel_err_state_vs_fallback=rel_err(state, s_x))
    rows.append(row)
    print_row(row)


def bench_ssd(lengths, bw, interpret, config, fallback_max_len, rows, official=None):
    kernel = jax.jit(lambda *a: ssd_pallas(*a, interpret=interpret, config=config))
    kernel_f = jax.jit(
        lambda *a: ssd_pallas(*a[:6], threshold=a[6], interpret=interpret, config=config)
    )
    # y written in bf16, as the official kernel returns it (fp32 accumulation either way)
    kernel_y16 = jax.jit(lambda *a: ssd_pallas(*a, interpret=interpret, config=config,
                                               y_dtype=jnp.bfloat16))
    fallback = jax.jit(lambda *a: ssd_chunked(*a, chunk_size=256))
    for length in lengths:
        args, thr = ssd_inputs(length)
        _measure("ssd", dict(h=64, p=64, n=128, g=1), kernel, kernel_f, fallback, args, thr,
                 length, bw, fallback_max_len, rows, official,
                 variants={"kernel_bf16_y_ms": kernel_y16})
        del args


def bench_ss(lengths, bw, interpret, config, fallback_max_len, rows, n=16, official=None):
    kernel = jax.jit(lambda *a: selective_scan_pallas(*a, interpret=interpret, config=config))
    kernel_f = jax.jit(
        lambda *a: selective_scan_pallas(
            *a[:6], threshold=a[6], interpret=interpret, config=config
        )
    )
    fallback = jax.jit(lambda *a: selective_scan_associative(*a))
    variants = {}
    if isinstance(config, SelectiveScanMosaicConfig):  # the Triton "lane" kernel beside it
        lane = SelectiveScanPallasConfig().resolve(n)
        variants["kernel_lane_ms"] = jax.jit(
            lambda *a: selective_scan_pallas(*a, interpret=interpret, config=lane))
    for length in lengths:
        args, thr = ss_inputs(length, n=n)
        _measure("selective_scan", dict(e=4096, n=n), kernel, kernel_f, fallback, args, thr,
                 length, bw, fallback_max_len, rows, official, variants=variants)
        del args


def print_row(r):
    fb = f"{r['fallback_ms']:9.3f}" if "fallback_ms" in r else "        -"
    err = f"{r['rel_err_y_vs_fallback']:.1e}" if "rel_err_y_vs_fallback" in r else "      -"
    off = f"{r['official_ms']:8.3f}" if "official_ms" in r else "       -"
    print(
        f"{r['op']:>15} {r['length']:>8} | kernel {r['kernel_ms']:8.3f} ms | "
        + (f"bf16 y {r['kernel_bf16_y_ms']:8.3f} | " if "kernel_bf16_y_ms" in r else "")
        + (f"lane {r['kernel_lane_ms']:8.3f} | " if "kernel_lane_ms" in r else "")
        + "filtered "
        f"{r['kernel_filtered_ms']:8.3f} (paired {r['filter_overhead_pct']:+5.1f}%, "
        f"seq {r['filter_overhead_seq_pct']:+5.1f}%, drop {r['filter_drop_vs_no_drop_pct']:+5.1f}%)"
        f" | official {off} | "
        f"fallback {fb} | "
        f"floor {r['floor_ms']:7.3f} | x floor {r['kernel_ms'] / r['floor_ms']:5.2f} | "
        f"err {err} | nan-free {r['nan_free']}"
        + (f" | official do_bench {r['official_do_bench_ms'] or float('nan'):.3f} ms, "
           "err vs official "
           + (f"{r['rel_err_y_vs_official']:.1e}" if "rel_err_y_vs_official" in r
              else "- (compared up to 64K)")
           if "official_ms" in r else "")
        + (f" | official: {r.get('official_error') or r.get('official_skipped')}"
           if "official_error" in r or "official_skipped" in r else ""),
        flush=True,
    )


# SSD candidates (SSDPallasConfig fields; the first one is the baseline the others are checked
# against). The default splits the sequence in `segments` (a states pass, then the scan; see
# kernels/ssd/pallas_triton.py and docs/kernels.md, "SSD"). Each row is the default with the
# fields given.
SSD_SWEEP = [
    dict(),  # default
    dict(chunk=32),
    dict(chunk=32, segments=4),
    dict(num_stages=4),
    dict(y_dtype="bfloat16"),
    dict(),  # the default again: drift over the sweep
]
SS_SWEEP = [  # SelectiveScanPallasConfig fields; the first one is the default ("lane")
    dict(), dict(layout="tile"), dict(segments=16), dict(segments=64), dict(block_e=64, block_t=4),
    dict(block_t=4), dict(prefetch=False), dict(fast_math=False), dict(),
]


def _sweep_one(name, length, c, run, args, thr, rows, ref=None, filtered=True, interpret=False,
               states=None, shape=None, **kw):
    """Times one config (and checks its output against `ref`); returns its output. `kw` go to
    `run` (e.g. y_dtype) and are reported with the config; `states`, a function of the args,
    is timed too; `shape` (e.g. {"n": 32}) is reported in the row."""
    shape = shape or {}
    try:
        plain = jax.jit(lambda *a: run(*a, config=c, interpret=interpret, **kw))
        filt = jax.jit(
            lambda *a: run(*a[:6], threshold=a[6], config=c, interpret=interpret, **kw))
        t_p, _ = time_fn(plain, *args)
        t_f = time_fn(filt, *args, thr)[0] if filtered else float("nan")
        out = plain(*args)
        err = rel_err(out[0], ref[0]) if ref is not None else 0.0
        c = f"{c}" + "".join(f", {k}={v}" for k, v in kw.items())
        extra = {}
        if states is not None:  # the states pass and its fold alone (segmented SSD configs)
            extra["states_ms"] = time_fn(states, *args)[0] * 1e3
        print(f"sweep {name} l={length}" + "".join(f" {k}={v}" for k, v in shape.items())
              + f" {c}: {t_p * 1e3:.3f} ms, filtered {t_f * 1e3:.3f} ms, "
              f"rel err vs baseline {err:.1e}"
              + (f", states pass {extra['states_ms']:.3f} ms" if extra else ""), flush=True)
        rows.append(dict(op=f"sweep_{name}", length=length, **shape, config=c, ms=t_p * 1e3,
                         filtered_ms=t_f * 1e3, rel_err_y_vs_baseline=err, **extra))
        return out
    except Exception as err:  # a config that does not compile is reported, not fatal
        print(f"sweep {name} {c}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        rows.append(dict(op=f"sweep_{name}", length=length, **shape, config=str(c),
                         error=f"{type(err).__name__}: {str(err)[:300]}"))
        return None


def _ssd_states_pass(config, interpret):
    """The segmented SSD's states pass and fold alone, as a function of the sweep's inputs
    (their length is a multiple of k chunks and p, n are tile sizes: no padding), or None."""
    if config.segments == 1:
        return None

    @jax.jit
    def states(x, dt, A, B, C, D):
        b, length, h, p = x.shape
        k = ssd_segments(b, length, config)
        if k == 1:  # too short to split: no states pass
            return jnp.zeros(())
        return _segment_initial_states(
            x, dt, A, B, jnp.full((h,), -jnp.inf), None, n_seg=k,
            seg_chunks=length // config.chunk // k, block_p=min(config.block_p, p),
            dot_dtype=jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32,
            config=config, interpret=interpret)

    return states


def sweep(lengths, ops, rows, interpret=False, checkpoint=lambda: None, filtered=False,
          ssd_configs=SSD_SWEEP, ss_configs=SS_SWEEP, ss_n=16):
    """Times each block-size candidate per length (with `filtered`, the filtered kernel too at
    the first length: the compare always runs, so it compiles to the same kernel)."""
    if "ssd" in ops:
        for i, length in enumerate(lengths):
            args, thr = ssd_inputs(length)
            ref = None
            for fields in ssd_configs:
                fields = dict(fields)
                kw = {"y_dtype": fields.pop("y_dtype")} if "y_dtype" in fields else {}
                c = SSDPallasConfig(**fields)
                out = _sweep_one("ssd", length, c, ssd_pallas, args, thr, rows, ref=ref,
                                 filtered=filtered and i == 0, interpret=interpret,
                                 states=_ssd_states_pass(c, interpret), **kw)
                if ref is None:
                    ref = out
                del out
                checkpoint()
            del args, ref
    if "selective_scan" in ops:
        for length in lengths:
            args, thr = ss_inputs(length, n=ss_n)
            ref = None
            for fields in ss_configs:
                c = SelectiveScanPallasConfig(**fields).resolve(ss_n)  # rows name its blocks
                out = _sweep_one("selective_scan", length, c,
                                 selective_scan_pallas, args, thr, rows, ref=ref,
                                 interpret=interpret, shape=dict(n=ss_n))
                ref = out if ref is None else ref
            del args, ref
            checkpoint()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--ssd-lengths", default="4K,16K,64K,256K")
    ap.add_argument("--ss-lengths", default="4K,16K,64K")
    ap.add_argument("--ss-state", type=int, default=16, metavar="N",
                    help="the selective scan's state size n (mamba-1.4b: 16)")
    ap.add_argument("--fallback-max-len", type=int, default=64 * K,
                    help="time the jnp fallback only up to this length (it is slow)")
    ap.add_argument("--million", action="store_true",
                    help="also run one SSD layer on 1M tokens (filtered) and check for NaN")
    ap.add_argument("--sweep", default="", metavar="L[,L...]",
                    help="first time the block-size candidates at these lengths")
    ap.add_argument("--sweep-ops", default="ssd,selective_scan",
                    help="which ops the sweep covers")
    ap.add_argument("--sweep-configs", default="", metavar="JSON",
                    help="SSD candidates (a JSON list of SSDPallasConfig field dicts, "
                         "y_dtype allowed) instead of SSD_SWEEP")
    ap.add_argument("--sweep-ss-configs", default="", metavar="JSON",
                    help="selective-scan candidates (a JSON list of SelectiveScanPallasConfig "
                         "field dicts) instead of SS_SWEEP")
    ap.add_argument("--official-src", default=os.environ.get("MAMBA_SSM_SRC", ".official"),
                    help="directory holding the official mamba_ssm sources")
    ap.add_argument("--no-official", action="store_true", help="skip the official columns")
    ap.add_argument("--skip-main", action="store_true", help="only the sweep")
    ap.add_argument("--ssd-config", default="",
                    help="SSDPallasConfig fields, e.g. chunk=64,block_p=32")
    ap.add_argument("--ss-kernel", choices=("default", "mosaic", "lane", "tile"),
                    default="default",
                    help="selective-scan kernel: the library default (Mosaic GPU on Hopper, "
                         "else the Triton lane layout) or one named")
    ap.add_argument("--ss-config", default="",
                    help="SelectiveScanMosaicConfig or SelectiveScanPallasConfig fields, for "
                         "the kernel --ss-kernel picks")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    ap.add_argument("--quick", action="store_true", help="tiny lengths (smoke test)")
    args = ap.parse_args(argv)

    def cfg(cls, text):
        return cls(**parse_fields(text))

    ssd_cfg = cfg(SSDPallasConfig, args.ssd_config)
    kind = args.ss_kernel
    if kind == "default":
        kind = "mosaic" if isinstance(default_config(args.interpret, args.ss_state),
                                      SelectiveScanMosaicConfig) else "lane"
    if kind == "mosaic":
        ss_cfg = cfg(SelectiveScanMosaicConfig, args.ss_config)
    else:
        ss_cfg = SelectiveScanPallasConfig(**{"layout": kind, **parse_fields(args.ss_config)})
        ss_cfg = ss_cfg.resolve(args.ss_state)
    if args.quick:
        args.ssd_lengths, args.ss_lengths = "256", "64"
    if not args.no_official:
        # torch shares the GPU: JAX must not grab 75% of it up front (set before JAX starts).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dev = jax.devices()[0]
    bw = copy_bandwidth(2 * K**3 if dev.platform == "gpu" else 64 * K**2)
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")
    print(f"ssd config {ssd_cfg}; selective-scan config {ss_cfg}", flush=True)
    official = official_ss = None
    if not args.no_official:
        official = OfficialScan(args.official_src)
        print("official mamba_ssm SSD: " + (
            "mamba_chunk_scan_combined (chunk_size 256)" if official.fn is not None
            else f"skipped ({official.reason})"), flush=True)
        official_ss = OfficialScan(args.official_src, op="selective_scan")
        print("official mamba_ssm selective scan: " + (
            "selective_scan_fn (CUDA; bf16 u, Δ, B, C, time last)" if official_ss.fn is not None
            else f"skipped ({official_ss.reason})"), flush=True)
    rows = []
    if args.sweep:
        sweep(lengths(args.sweep), args.sweep_ops.split(","), rows, args.interpret,
              checkpoint=lambda: save(args.out, dev, bw, ssd_cfg, ss_cfg, rows),
              ssd_configs=json.loads(args.sweep_configs) if args.sweep_configs else SSD_SWEEP,
              ss_configs=json.loads(args.sweep_ss_configs) if args.sweep_ss_configs
              else SS_SWEEP, ss_n=args.ss_state)
        save(args.out, dev, bw, ssd_cfg, ss_cfg, rows)
    if not args.skip_main:
        bench_ssd(lengths(args.ssd_lengths), bw, args.interpret, ssd_cfg,
                  args.fallback_max_len, rows, official)
        save(args.out, dev, bw, ssd_cfg, ss_cfg, rows)
        bench_ss(lengths(args.ss_lengths), bw, args.interpret, ss_cfg,
                 args.fallback_max_len, rows, n=args.ss_state, official=official_ss)
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
    result = save(args.out, dev, bw, ssd_cfg, ss_cfg, rows)
    if args.out:
        print(f"wrote {args.out}")
    return result


def save(out, dev, bw, ssd_cfg, ss_cfg, rows):
    """The JSON record (written after each stage, so a run cut short keeps what it measured)."""
    result = dict(
        device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
        python=platform.python_version(), copy_bandwidth_bytes_per_s=bw,
        ssd_config=str(ssd_cfg), selective_scan_config=str(ss_cfg),
        command=" ".join(sys.argv), rows=rows,
    )
    versions = {}
    for mod in ("torch", "triton"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    result.update(versions)
    if out:
        write_json(out, result)
    return result


if __name__ == "__main__":
    main()
