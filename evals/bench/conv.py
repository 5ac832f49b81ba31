"""Speed of the mixers' causal conv1d + silu at prefill: the jnp form XLA compiles, the Pallas
kernel (`kernels/causal_conv.py`), causal_conv1d's CUDA kernel (what mamba_ssm runs), and the
memory floor (the conv's input read once + its output written once / copy bandwidth).

    python evals/bench/conv.py --out conv.json         # on a GPU (official: after
                                                       # evals/device/build_official.sh)
    python evals/bench/conv.py --interpret --lengths 256 --no-official   # CPU smoke run

Shapes: one mamba2-1.3b layer (the conv reads x | B | C = 4096 | 128 | 128 columns in place from
in_proj's 8,512-wide bf16 output and writes x, B and C apart) and one mamba-1.4b layer (x, the
first 4,096 of 8,192 columns), batch 1. Each form does what the mixer needs, from in_proj's
output to the scan's inputs in bf16: the jnp form slices, converts, convolves, applies silu,
rounds and splits as `Mamba2Mixer` does without the kernel. The official form calls
`causal_conv1d_fn` on the columns as mamba_ssm's Mamba2 does (a channels-last view of in_proj's
output, silu fused), on the same values through DLPack, timed by the same loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

from longmamba_evals.bench.common import K, lengths, rel_err, write_json
from longmamba_evals.bench.official import official_conv
from longmamba_evals.bench.timing import copy_bandwidth, time_fn
from longmamba_kernels.causal_conv import causal_conv1d

SHAPES = {  # name: (in_proj width, first conv column, output widths)
    "mamba2-1.3b": (8512, 4096, (4096, 128, 128)),
    "mamba-1.4b": (8192, 0, (4096,)),
}


def jnp_form(src, w, bias, *, offset, splits):
    """What the mixer runs without the kernel: slice, fp32, the 4 taps, bias, silu, bf16, split."""
    length, c = src.shape[1], sum(splits)
    bounds = [sum(splits[:i]) for i in range(len(splits) + 1)]
    xbc = src[..., offset:offset + c].astype(jnp.float32)
    full = jnp.pad(xbc, ((0, 0), (3, 0), (0, 0)))
    y = sum(full[:, i:i + length] * w[i].astype(jnp.float32) for i in range(4))
    y = y + bias.astype(jnp.float32)
    y = (y * jax.nn.sigmoid(y)).astype(jnp.bfloat16)
    return tuple(y[..., lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4K,16K,64K")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--block-t", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=8)
    ap.add_argument("--official-src", default=os.environ.get("MAMBA_SSM_SRC", ".official"))
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    dev = jax.devices()[0]
    bw = copy_bandwidth(2 * K**3 if dev.platform == "gpu" else 64 * K**2)
    fn_off, why = (None, "--no-official") if args.no_official else official_conv(args.official_src)
    print(f"device: {dev.device_kind}; jax {jax.__version__}; copy bandwidth "
          f"{bw / 1e12:.3f} TB/s; official: {'causal_conv1d_fn' if fn_off else why}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        width, offset, splits = SHAPES[name]
        c = sum(splits)
        for length in lengths(args.lengths):
            k = jax.random.split(jax.random.key(length), 3)
            src = jax.random.normal(k[0], (1, length, width), jnp.bfloat16)
            w = (0.5 * jax.random.normal(k[1], (4, c))).astype(jnp.bfloat16)
            bias = (0.1 * jax.random.normal(k[2], (c,))).astype(jnp.bfloat16)

            f_jnp = jax.jit(functools.partial(jnp_form, offset=offset, splits=splits))
            f_pal = jax.jit(functools.partial(
                causal_conv1d, offset=offset, splits=splits, activation="silu",
                out_dtype=jnp.bfloat16, implementation="pallas", interpret=args.interpret,
                block_t=args.block_t, num_warps=args.num_warps))
            f_pal = (lambda f: lambda *a: f(*a)[0])(f_pal)  # the outputs, not the state
            ref, out = f_jnp(src, w, bias), f_pal(src, w, bias)
            err = rel_err(jnp.concatenate(out, -1), jnp.concatenate(ref, -1))
            floor = 2 * (length * c * 2) / bw
            row = dict(shape=name, length=length, channels=c, block_t=args.block_t,
                       num_warps=args.num_warps,
                       jnp_ms=time_fn(f_jnp, src, w, bias)[0] * 1e3,
                       pallas_ms=time_fn(f_pal, src, w, bias)[0] * 1e3,
                       floor_ms=floor * 1e3, rel_err_pallas_vs_jnp=err)
            if fn_off is not None:
                import torch

                s_t = torch.from_dlpack(src)
                x_t = s_t[:, :, offset:offset + c].transpose(1, 2)  # [b, c, l], channels last
                w_t, b_t = torch.from_dlpack(w).t().contiguous(), torch.from_dlpack(bias)

                def off(x_t=x_t, w_t=w_t, b_t=b_t):
                    return fn_off(x_t, w_t, b_t, activation="silu")

                y_t = off()
                row["official_ms"] = time_fn(off, sync=lambda _: torch.cuda.synchronize())[0] * 1e3
                y_o = jnp.asarray(y_t.transpose(1, 2).float().cpu().numpy())
                row["rel_err_pallas_vs_official"] = rel_err(
                    jnp.concatenate(out, -1).astype(jnp.float32), y_o)
                del y_t, x_t, s_t
            rows.append(row)
            off_s = (f"official {row['official_ms']:7.3f} ms "
                     f"(err {row['rel_err_pallas_vs_official']:.1e}) | "
                     if "official_ms" in row else "")
            print(f"{name:>12} {length:>7} | jnp {row['jnp_ms']:7.3f} ms | pallas "
                  f"{row['pallas_ms']:7.3f} ms | {off_s}floor {row['floor_ms']:7.3f} ms | "
                  f"pallas / floor {row['pallas_ms'] / row['floor_ms']:.2f} | err {err:.1e}",
                  flush=True)
    result = dict(device=dev.device_kind, jax=jax.__version__, copy_bandwidth_bytes_per_s=bw,
                  command=" ".join(sys.argv), official=why or "causal_conv1d_fn", rows=rows)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
