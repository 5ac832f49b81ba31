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
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import longmamba_jax as lmj
from longmamba_evals.bench.common import lengths, write_json
from longmamba_evals.bench.model_setup import random_params, random_tokens
from longmamba_evals.bench.timing import paired_ratio, time_paired

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


def run(args) -> dict:
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "backend": args.backend,
           "docs": args.docs, "rows": []}
    print(f"{'arch':>7} {'total':>7} {'case':>7} {'median ms':>10} {'tokens/s':>12} "
          f"{'vs one':>8}", flush=True)
    for arch in args.archs:
        params = random_params(arch, args.small)
        for total in args.total:
            medians, per_round = time_paired(calls(params, total, args.docs, args.backend),
                                             rounds=args.rounds)
            for case in CASES:
                row = {"arch": arch, "total": total, "docs": 1 if case == "one" else args.docs,
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
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
