"""Runs the SSD Pallas kernel on one mamba2-1.3b layer (or, with `--op selective_scan`, the
selective scan on one mamba-1.4b layer), for a profiler to look at.

    ncu --kernel-name regex:ssd_chunk_scan python evals/bench/profile_ssd.py --length 16384
    bash evals/device/profile_ssd.sh        # on a GPU: the ncu report in $OUT
    OP=selective_scan bash evals/device/profile_ssd.sh   # the selective scan, with SASS
    GRAD=1 bash evals/device/profile_ssd.sh   # forward + backward: time per kernel (ncu)

Inputs are those of `scan.py` (random, bf16 x/B/C). Prints the median time of the calls
after the first (which compiles)."""

from __future__ import annotations

import argparse
import statistics

import jax

from longmamba_evals.bench.common import parse_fields
from longmamba_evals.bench.scan import ss_inputs, ssd_inputs
from longmamba_evals.bench.timing import timed
from longmamba_kernels.selective_scan import selective_scan_pallas
from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig
from longmamba_kernels.ssd.pallas_backward import SSDBackwardConfig
from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("ssd", "selective_scan"), default="ssd")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--y-dtype", default=None, help="e.g. bfloat16 (default: fp32 y)")
    ap.add_argument("--config", default="",
                    help="SSDPallasConfig (or SelectiveScanPallasConfig) fields, e.g. "
                         "segments=2,precompute_cb=False")
    ap.add_argument("--backward-config", default="",
                    help="SSDBackwardConfig fields for --grad, e.g. heads_per_program=1")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--grad", action="store_true",
                    help="forward + backward (the VJP for a random dy), as training runs it")
    a = ap.parse_args(argv)
    if a.op == "ssd":
        config = SSDPallasConfig(**parse_fields(a.config))
        args, _ = ssd_inputs(a.length)
        backward_config = SSDBackwardConfig(**parse_fields(a.backward_config))
        f = jax.jit(lambda *x: ssd_pallas(*x, config=config, y_dtype=a.y_dtype,
                                          interpret=a.interpret,
                                          backward_config=backward_config))
    else:
        config = SelectiveScanPallasConfig(**parse_fields(a.config))
        args, _ = ss_inputs(a.length)
        f = jax.jit(lambda *x: selective_scan_pallas(*x, config=config, interpret=a.interpret))
    if a.grad:
        forward = f

        def f(*x):
            y, vjp = jax.vjp(lambda *v: forward(*v)[0], *x)
            return vjp(jax.numpy.ones_like(y))

        f = jax.jit(f)
    print(config, f"forward + backward ({backward_config})" if a.grad and a.op == "ssd"
          else "forward + backward" if a.grad else "forward", flush=True)
    jax.block_until_ready(args)
    first, times = timed(lambda: f(*args), a.reps)
    print(f"{a.op} l={a.length}: {statistics.median(times) * 1e3:.3f} ms per call "
          f"(one sync each; first call {first:.1f} s)")


if __name__ == "__main__":
    main()
