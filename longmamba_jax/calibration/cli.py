"""The calibration command: `longmamba-calibrate` or `python -m longmamba_jax.calibration`.

    longmamba-calibrate --model SRC --text FILE --tokenizer NAME_OR_DIR|bytes --train-len N \\
        --out FILE [--num-windows 100] [--clamp-top 0.10] [--aggregate mean] [--separator SEP]

With `--separator`, the text is split into documents there and calibrated as a packed stream
(each document starts from a zero state: docs/design.md, "LongMamba calibration").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from longmamba_jax.calibration.record import calibrate


def _unescape(separator: str) -> str:
    """`--separator` with backslash escapes (\\n, \\t, \\x00, ...) read; never empty."""
    try:
        sep = separator.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise ValueError(f"--separator {separator!r}: {e.reason}") from None
    if not sep:
        raise ValueError("--separator must not be empty")
    return sep


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
    parser.add_argument("--storage", choices=("auto", "exact", "grid"), default="auto",
                        help="exact: every channel's sorted curves, which the 'alpha' and "
                             "'offline' rules need; grid: θ on a grid of lengths (small); auto: "
                             "exact for small inputs")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--separator", default=None,
                        help="split --text into documents at this string (backslash escapes "
                             "such as \\n are read) and calibrate them as packed documents, "
                             "each starting from a zero state")
    args = parser.parse_args(argv)

    from longmamba_jax.model_spec import parse_model_spec
    from longmamba_jax.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        params = parse_model_spec(args.model).load(vocab_size=tokenizer.vocab_size)
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if args.separator is None:
            tokens = np.asarray(tokenizer.encode(text), np.int64)
            described = f"{tokens.size} tokens"
        else:
            tokens = [np.asarray(tokenizer.encode(doc), np.int64)
                      for doc in text.split(_unescape(args.separator)) if doc]
            if not tokens:
                raise ValueError(f"{args.text} has no text between the separators")
            described = (f"{len(tokens)} documents, {sum(d.size for d in tokens)} tokens "
                         f"(packed)")
        print(f"{args.text}: {described}; {args.num_windows} windows of {args.train_len}",
              file=sys.stderr)
        cal = calibrate(params, tokens, train_len=args.train_len, num_windows=args.num_windows,
                        clamp_top=args.clamp_top, aggregate=args.aggregate,
                        backend=args.backend, batch_size=args.batch_size,
                        storage=args.storage)
        cal.save(args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_global = sum(int(np.sum(g)) for g in cal.global_channels(0.05))
    print(f"wrote {args.out}: {params.config.n_ssm_layer} SSM layers, {n_global} global channels "
          f"(tA_prod > 0.05)", file=sys.stderr)
    return 0
