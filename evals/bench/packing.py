"""Prefill time of packed documents against one document of the same total length, and against
the same documents as a batch, interleaved.

    python evals/bench/packing.py --out packing.json                            # on a GPU
    python evals/bench/packing.py --small --total 1K --docs 4 --out p.json      # CPU smoke run

Random-weight models with mamba2-1.3b's and mamba-1.4b's shapes (bf16). For `--total` tokens
split into `--docs` documents of equal length, three prefills of the same tokens:
  one     [1, total], a single document;
  packed  [1, total] with segment_ids (every document starts from a zero state);
  batch   [docs, total / docs], one document a row.
They run in rotating order (`timing.time_paired`); packed's and batch's costs are reported as
the median of the per-round ratios to `one`.

Two more sections (`--sections`, default all three: model,layer,calls):
  layer   one layer's scan kernel (mamba2-1.3b's SSD layer, mamba-1.4b's selective scan, bf16,
          inputs as in evals/bench/scan.py) at `--layer-lengths`, without and with segment_ids
          marking documents of `--doc-len` tokens, interleaved: the cost of the reset itself;
  calls   `--calls-docs` documents of `--doc-len` tokens prefilled packed in one call
          ([1, docs · doc_len] with segment_ids) against one call per document ([1, doc_len],
          dispatched back to back, the last one waited for) and against a batch
          [docs, doc_len], interleaved, for each of `--calls-archs`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import longmamba_jax as lmj
from longmamba_evals.bench.common import lengths, write_json
from longmamba_evals.bench.model_setup import random_params, random_tokens
from longmamba_evals.bench.scan import ss_inputs, ssd_inputs
from longmamba_evals.bench.timing import paired_ratio, time_paired
from longmamba_kernels.selective_scan import selective_scan_pallas
from longmamba_kernels.ssd.pallas_triton import ssd_pallas

CASES = ("one", "packed", "batch")


def calls(params, total: int, docs: int, backend: str) -> dict:
    """{case: (fn, args)} for `time_paired`: the three prefills of the same `total` tokens."""
    if total % docs:
        raise ValueError(f"--total {total} is not a multiple of --docs {docs}")
    tokens = random_tokens(1, total, params.config.vocab_size, seed=total)
    seg = jnp.repeat(jnp.arange(docs, dtype=jnp.int32), total // docs)[None]
    prefill = lambda p, t, s=None: lmj.prefill(p, t, segment_ids=s, backend=backend)
    return {"one": (prefill, (params, tokens)),
            "packed": (prefill, (params, tokens, seg)),
            "batch": (prefill, (params, tokens.reshape(docs, total // docs)))}


def layer_rows(args, out: dict) -> None:
    """One layer's scan with and without segment_ids (documents of `args.doc_len`)."""
    interpret = jax.default_backend() != "gpu"
    kernels = {"ssd": ssd_pallas, "selective_scan": selective_scan_pallas}
    shapes = {"ssd": dict(h=8, p=16, n=16) if args.small else {},
              "selective_scan": dict(e=64, n=8) if args.small else {}}
    print(f"{'op':>15} {'length':>7} {'doc':>6} {'plain ms':>9} {'packed ms':>9} "
          f"{'packed vs plain':>15}", flush=True)
    for op, kernel in kernels.items():
        plain = jax.jit(lambda *a, k=kernel: k(*a, interpret=interpret))
        packed = jax.jit(lambda *a, k=kernel: k(*a[:-1], segment_ids=a[-1], interpret=interpret))
        for length in args.layer_lengths:
            make = ssd_inputs if op == "ssd" else ss_inputs
            inputs, _ = make(length, **shapes[op])
            seg = (jnp.arange(length, dtype=jnp.int32) // args.doc_len)[None]
            medians, per_round = time_paired({"plain": (plain, inputs),
                                              "packed": (packed, (*inputs, seg))},
                                             rounds=args.rounds)
            row = {"section": "layer", "op": op, "length": length, "doc_len": args.doc_len,
                   "plain_ms": 1e3 * medians["plain"], "packed_ms": 1e3 * medians["packed"],
                   "packed_vs_plain_pct": 100 * (paired_ratio(per_round, "packed", "plain") - 1),
                   "paired_ms": {k: [1e3 * t for t in v] for k, v in per_round.items()}}
            out["rows"].append(row)
            print(f"{op:>15} {length:>7} {args.doc_len:>6} {row['plain_ms']:9.3f} "
                  f"{row['packed_ms']:9.3f} {row['packed_vs_plain_pct']:+14.2f}%", flush=True)
            write_json(args.out, out)
            del inputs


def calls_rows(args, out: dict) -> None:
    """`args.calls_docs` documents: packed in one prefill, one prefill each, and a batch."""
    docs, doc_len = args.calls_docs, args.doc_len
    print(f"{'arch':>12} {'docs':>5} {'doc':>6} {'packed ms':>10} {'calls ms':>10} "
          f"{'batch ms':>10} {'calls/packed':>12}", flush=True)
    for arch in args.calls_archs:
        params = random_params(arch, args.small)
        tokens = random_tokens(docs, doc_len, params.config.vocab_size, seed=docs)
        flat = tokens.reshape(1, docs * doc_len)
        seg = jnp.repeat(jnp.arange(docs, dtype=jnp.int32), doc_len)[None]
        prefill = jax.jit(lambda p, t, s=None: lmj.prefill(p, t, segment_ids=s,
                                                           backend=args.backend))
        rows_of = [tokens[i:i + 1] for i in range(docs)]

        def one_call_each(p, rows, prefill=prefill):
            return [prefill(p, r) for r in rows]

        medians, per_round = time_paired({
            "packed": (prefill, (params, flat, seg)),
            "calls": (one_call_each, (params, rows_of)),
            "batch": (prefill, (params, tokens)),
        }, rounds=args.rounds)
        row = {"section": "calls", "arch": arch, "docs": docs, "doc_len": doc_len,
               **{f"{k}_ms": 1e3 * v for k, v in medians.items()},
               "calls_over_packed": paired_ratio(per_round, "calls", "packed"),
               "batch_over_packed": paired_ratio(per_round, "batch", "packed")}
        out["rows"].append(row)
        print(f"{arch:>12} {docs:>5} {doc_len:>6} {row['packed_ms']:10.2f} "
              f"{row['calls_ms']:10.2f} {row['batch_ms']:10.2f} "
              f"{row['calls_over_packed']:11.1f}x", flush=True)
        write_json(args.out, out)
        del params


def run(args) -> dict:
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "backend": args.backend,
           "docs": args.docs, "rows": []}
    if "layer" in args.sections:
        layer_rows(args, out)
    if "calls" in args.sections:
        calls_rows(args, out)
    if "model" not in args.sections:
        write_json(args.out, out)
        return out
    print(f"{'arch':>7} {'total':>7} {'case':>7} {'median ms':>10} {'tokens/s':>12} "
          f"{'vs one':>8}", flush=True)
    for arch in args.archs:
        params = random_params(arch, args.small)
        for total in args.total:
            medians, per_round = time_paired(calls(params, total, args.docs, args.backend),
                                             rounds=args.rounds)
            for case in CASES:
                row = {"section": "model", "arch": arch, "total": total,
                       "docs": 1 if case == "one" else args.docs,
                       "case": case, "median_ms": 1e3 * medians[case],
                       "tokens_per_s": total / medians[case],
                       "vs_one_pct": 0.0 if case == "one" else
                       100 * (paired_ratio(per_round, case, "one") - 1)}
                out["rows"].append(row)
                print(f"{arch:>7} {total:>7} {case:>7} {row['median_ms']:10.3f} "
                      f"{row['tokens_per_s']:12.0f} {row['vs_one_pct']:+7.2f}%", flush=True)
            write_json(args.out, out)
    write_json(args.out, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python evals/bench/packing.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="mamba2,mamba1", type=lambda s: s.split(","))
    p.add_argument("--total", default="16K", type=lengths, help="total tokens (list)")
    p.add_argument("--docs", type=int, default=16, help="documents packed / batched")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--backend", default="auto")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--sections", default="layer,calls,model", type=lambda s: s.split(","))
    p.add_argument("--layer-lengths", default="16K,64K", type=lengths)
    p.add_argument("--doc-len", default="1K", type=lambda s: lengths(s)[0],
                   help="document length of the layer and calls sections")
    p.add_argument("--calls-docs", type=int, default=64)
    p.add_argument("--calls-archs", default="mamba2-130m,mamba1-130m,mamba2,mamba1",
                   type=lambda s: s.split(","))
    args = p.parse_args(argv)
    if unknown := set(args.sections) - {"layer", "calls", "model"}:
        p.error(f"unknown --sections {sorted(unknown)} (layer, calls, model)")
    return run(args)


if __name__ == "__main__":
    main()
