"""The Mosaic GPU selective scan against the Triton "lane" kernel (E=4096, N=16, batch 1).

    python evals/bench_mosaic_scan.py [--lengths 4K,16K] [--configs 4:64:8:2] [--fused] [--out F]

Each config is per_thread:block_t:unroll:stages. Prints ms, the relative error of y and of the
final state against the lane kernel, and a NaN check. --fused: the raw Δ projection with bias
and softplus, and the gate z (the Mamba-1 mixer's call).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_evals.bench_scan import parse_lengths, ss_inputs, time_fn
from longmamba_kernels.selective_scan import selective_scan_pallas
from longmamba_kernels.selective_scan.pallas_mosaic import (
    SelectiveScanMosaicConfig,
    selective_scan_mosaic,
)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16K")
    p.add_argument("--configs", default="4:64:8:2")
    p.add_argument("--fused", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = []
    dev = jax.devices()[0].device_kind
    print("device", dev, "jax", jax.__version__, "fused" if a.fused else "plain")
    for length in parse_lengths(a.lengths):
        (x, dt, A, B, C, D), thr = ss_inputs(length)
        e = x.shape[-1]
        kw = dict(out_dtype=jnp.bfloat16)
        if a.fused:
            k = jax.random.split(jax.random.key(7), 2)
            dt = (jax.random.normal(k[0], dt.shape) - 2.0).astype(jnp.bfloat16)
            kw.update(dt_bias=jnp.full((e,), 0.1), dt_softplus=True, D=D,
                      z=jax.random.normal(k[1], (1, length, 2 * e), jnp.bfloat16))
        else:
            dt = dt.astype(jnp.bfloat16)
        args = (x, dt, A, B, C)
        lane = jax.jit(lambda *args, kw=kw: selective_scan_pallas(*args, **kw))
        t_lane, _ = time_fn(lane, *args)
        y_ref, h_ref = (np.asarray(v, np.float32) for v in lane(*args))
        rows.append(dict(length=length, kernel="lane", ms=t_lane * 1e3))
        print(f"{length:7d} lane             {t_lane*1e3:8.3f} ms", flush=True)
        for cfg in a.configs.split(","):
            pt, bt, un, st = (int(v) for v in cfg.split(":"))
            c = SelectiveScanMosaicConfig(per_thread=pt, block_t=bt, unroll=un, stages=st)
            for filt in (False, True):
                try:
                    f = jax.jit(lambda *args, c=c, filt=filt, thr=thr, kw=kw:
                                selective_scan_mosaic(*args, threshold=thr if filt else None,
                                                      config=c, **kw))
                    t, _ = time_fn(f, *args)
                    y, h = (np.asarray(v, np.float32) for v in f(*args))
                    nan = bool(np.isnan(y).any() or np.isnan(h).any())
                    row = dict(length=length, kernel="mosaic", config=cfg, filtered=filt,
                               ms=t * 1e3, nan=nan)
                    if not filt:
                        row["err_y"] = float(np.abs(y - y_ref).max() / np.abs(y_ref).max())
                        row["err_h"] = float(np.abs(h - h_ref).max() / np.abs(h_ref).max())
                    rows.append(row)
                    print(f"{length:7d} mosaic {cfg:10s}{' filt' if filt else '     '} "
                          f"{t*1e3:8.3f} ms  err y {row.get('err_y', 0):.2e} "
                          f"h {row.get('err_h', 0):.2e} nan {nan}", flush=True)
                except Exception as ex:  # noqa: BLE001 - a sweep: report and go on
                    traceback.print_exc(limit=2)
                    rows.append(dict(length=length, kernel="mosaic", config=cfg,
                                     error=repr(ex)[:2000]))
                    print(f"{length:7d} mosaic {cfg:10s} FAILED {repr(ex)[:300]}", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(device=dev, jax=jax.__version__, fused=a.fused, rows=rows), fh,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
