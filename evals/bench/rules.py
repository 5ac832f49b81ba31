"""Prefill time of LongMamba's token-selection rules against vanilla, interleaved.

    python evals/bench/rules.py --out rules.json                  # on a GPU
    python evals/bench/rules.py --small --lengths 512 --out r.json  # CPU smoke run

Random-weight models with mamba2-1.3b's and mamba-1.4b's shapes (bf16), batch 1. The
calibration is measured on one window of `--train-len` tokens of a random prompt, and every
channel is made global (channel_threshold −1: a random model's decay fractions underflow, and
the rules' cost is the same whichever channels are global). Each length times vanilla and every
rule in rotating order (`timing.time_paired`), and reports each rule's overhead as the median of
the per-round ratios. Rules that need what the calibration lacks (α of a grid calibration) are
skipped with the reason.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import lengths, write_json
from longmamba_evals.bench.model_setup import random_params, random_tokens
from longmamba_evals.bench.timing import paired_ratio, time_paired
from longmamba_jax.calibration import layer_A
from longmamba_jax.model import apply_model
from longmamba_jax.selection import RULES


def calibration(params, train_len: int):
    tokens = random_tokens(1, train_len, params.config.vocab_size, seed=3)
    dt = np.asarray(apply_model(params, tokens, capture_dt=True, last_n=1).dt, np.float32)
    cfg = params.config
    return lmj.Calibration.from_deltas(list(dt), layer_A(params), train_len=train_len,
                                       fingerprint=cfg.fingerprint)


def run(args) -> dict:
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
    for arch in args.archs:
        params = random_params(arch, args.small)
        cal = calibration(params, args.train_len)
        methods, skipped = {"vanilla": None}, {}
        for rule in args.rules:
            try:
                m = lmj.LongMamba(cal, channel_threshold=-1.0, rule=rule)
                m.layer_filters(params.config, max(args.lengths))
            except ValueError as e:
                skipped[rule] = str(e)
                continue
            methods[rule] = m
        for rule, why in skipped.items():
            print(f"{arch}: {rule} skipped: {why}", file=sys.stderr)
        for length in args.lengths:
            tokens = random_tokens(1, length, params.config.vocab_size, seed=length)
            calls = {name: (lambda p, t, m=m: lmj.prefill(p, t, method=m,
                                                          backend=args.backend),
                            (params, tokens))
                     for name, m in methods.items()}
            medians, per_round = time_paired(calls, rounds=args.rounds)
            for name in methods:
                row = {"arch": arch, "length": length, "rule": name,
                       "median_ms": 1e3 * medians[name],
                       "tokens_per_s": length / medians[name]}
                if name != "vanilla":
                    row["overhead_pct"] = 100 * (paired_ratio(per_round, name, "vanilla") - 1)
                out["rows"].append(row)
                print(f"{arch} {length:>6} {name:>16} {row['median_ms']:9.3f} ms "
                      f"{row.get('overhead_pct', 0.0):+7.2f}%", flush=True)
            write_json(args.out, out)
        out.setdefault("skipped", {})[arch] = skipped
    write_json(args.out, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python evals/bench/rules.py", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="mamba2,mamba1", type=lambda s: s.split(","))
    p.add_argument("--lengths", default="16K,64K", type=lengths)
    p.add_argument("--rules", default=",".join(RULES), type=lambda s: s.split(","))
    p.add_argument("--train-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="auto")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
