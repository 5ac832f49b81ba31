"""How XLA runs the models' projections, by the way `Linear` asks for them (a prefill spends half
its GPU time here; see `profile_prefill.py`).

    python evals/bench/gemm.py --out gemm.json          # on a GPU
    python evals/bench/gemm.py --length 256             # smoke run on CPU

Variants, each y = x @ W for bf16 x and W, y in bf16:
  f32_then_cast   einsum with preferred_element_type=f32, then astype(bf16) (what Linear does)
  bf16_out        einsum with preferred_element_type=bf16 (fp32 accumulation all the same)
  w_out_in        W stored [out, in] as torch stores it, bf16 out
  torch           torch.nn.functional.linear on the same data (cuBLAS), when torch has CUDA
Shapes: the in_proj and out_proj of mamba2-1.3b and mamba-1.4b at one prefill length.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_evals.bench.common import write_json
from longmamba_evals.bench.timing import time_fn

SHAPES = {  # name: (in, out)
    "mamba2 in_proj": (2048, 8512),
    "mamba2 out_proj": (4096, 2048),
    "mamba1 in_proj": (2048, 8192),
    "mamba1 out_proj": (4096, 2048),
}


def variants():
    bf16, f32 = jnp.bfloat16, jnp.float32
    return {
        "f32_then_cast": jax.jit(lambda x, w: jnp.einsum(
            "li,io->lo", x, w, preferred_element_type=f32).astype(bf16)),
        "bf16_out": jax.jit(lambda x, w: jnp.einsum(
            "li,io->lo", x, w, preferred_element_type=bf16)),
        "w_out_in": jax.jit(lambda x, wt: jnp.einsum(
            "li,oi->lo", x, wt, preferred_element_type=bf16)),
    }


def torch_linear():
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None

    def run(x, wt):
        return torch.nn.functional.linear(x, wt)

    def sync(out):
        torch.cuda.synchronize()
        return out

    return torch, run, sync


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    rows = []
    fns = variants()
    th = torch_linear()
    print(f"device {dev.device_kind}, jax {jax.__version__}, tokens {args.length}")
    for name, (d_in, d_out) in SHAPES.items():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((args.length, d_in)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.bfloat16)
        wt = jnp.asarray(w.T)
        ref = fns["f32_then_cast"](x, w)
        flop = 2 * args.length * d_in * d_out
        row = {"shape": name, "tokens": args.length, "in": d_in, "out": d_out}
        for vname, fn in fns.items():
            arg = wt if vname == "w_out_in" else w
            s, _ = time_fn(fn, x, arg)
            diff = float(jnp.max(jnp.abs(fn(x, arg).astype(jnp.float32) - ref.astype(jnp.float32))))
            row[vname] = {"ms": s * 1e3, "tflops": flop / s / 1e12, "max_abs_diff": diff}
        if th is not None:
            torch, run, sync = th
            xt = torch.from_dlpack(x)
            wtt = torch.from_dlpack(wt)
            s, _ = time_fn(run, xt, wtt, sync=sync)
            row["torch"] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
        rows.append(row)
        print(f"{name:16s} " + "  ".join(
            f"{k} {v['ms']:.3f} ms ({v['tflops']:.0f} TF/s)" for k, v in row.items()
            if isinstance(v, dict)), flush=True)
    result = {"device": dev.device_kind, "jax": jax.__version__, "command": " ".join(sys.argv),
              "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
