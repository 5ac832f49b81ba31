"""The calibration command: `longmamba-calibrate` or `python -m longmamba_jax.calibration`.

    longmamba-calibrate --model SRC --text FILE --tokenizer NAME_OR_DIR|bytes --train-len N \\
        --out FILE [--num-windows 100] [--clamp-top 0.10] [--aggregate mean]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from longmamba_jax.calibration.record import calibrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longmamba-calibrate",
                                     description="LongMamba calibration of a model on a long text.")
    parser.add_argument("--model", required=True,
                        help="checkpoint directory or hub id, 'demo', or tiny-random:mamba1|2")
    parser.add_argument("--text", required=True, help="a long plain-text file")
    parser.add_argument("--tokenizer", required=True,
                        help="'bytes' or a local Hugging Face tokenizer directory / name")
    parser.add_argument("--train-len", type=int, required=True)
    parser.add_argument("--out", required=True, help="calibration file to write (.npz)")
    parser.add_argument("--num-windows", type=int, default=100)
    parser.add_argument("--clamp-top", type=float, default=0.10)
    parser.add_argument("--aggregate", choices=("mean", "max"), default="mean")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    from longmamba_jax.model_spec import parse_model_spec
    from longmamba_jax.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        params = parse_model_spec(args.model).load(vocab_size=tokenizer.vocab_size)
        with open(args.text, encoding="utf-8", errors="replace") as f:
            tokens = np.asarray(tokenizer.encode(f.read()), np.int64)
        print(f"{args.text}: {tokens.size} tokens; {args.num_windows} windows of "
              f"{args.train_len}", file=sys.stderr)
        cal = calibrate(params, tokens, train_len=args.train_len, num_windows=args.num_windows,
                        clamp_top=args.clamp_top, aggregate=args.aggregate,
                        backend=args.backend, batch_size=args.batch_size)
        cal.save(args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_global = sum(int(np.sum(g)) for g in cal.global_channels(0.05))
    print(f"wrote {args.out}: {params.config.n_ssm_layer} SSM layers, {n_global} global channels "
          f"(tA_prod > 0.05)", file=sys.stderr)
    return 0
