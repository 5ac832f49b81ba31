"""Runs the SSD Pallas kernel on one mamba2-1.3b layer, for a profiler to look at.

    ncu --kernel-name regex:ssd_chunk_scan python evals/profile_ssd.py --length 16384
    bash evals/profile_ssd.sh        # on the device machine: the ncu report in $OUT

Inputs are those of `bench_scan.py` (random, bf16 x/B/C). Prints the median time of the calls
after the first (which compiles)."""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from longmamba_evals.bench_scan import parse_fields, ssd_inputs
from longmamba_kernels.ssd_pallas import SSDPallasConfig, ssd_pallas


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--y-dtype", default=None, help="e.g. bfloat16 (default: fp32 y)")
    ap.add_argument("--config", default="",
                    help="SSDPallasConfig fields, e.g. segments=2,precompute_cb=False")
    ap.add_argument("--interpret", action="store_true")
    a = ap.parse_args(argv)
    config = SSDPallasConfig(**parse_fields(a.config))
    print(config, flush=True)
    args, _ = ssd_inputs(a.length)
    jax.block_until_ready(args)
    f = jax.jit(lambda *x: ssd_pallas(*x, config=config, y_dtype=a.y_dtype,
                                      interpret=a.interpret))
    times = []
    for _ in range(a.reps + 1):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    print(f"ssd_pallas l={a.length}: {statistics.median(times[1:]) * 1e3:.3f} ms per call "
          f"(one sync each; first call {times[0]:.1f} s)")


if __name__ == "__main__":
    main()
