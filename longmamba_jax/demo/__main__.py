"""`python -m longmamba_jax.demo [--multiple 16] [--depth 0.5] [--key 12345 | --seed 0]`

Loads the bundled 5.8M-parameter byte-level Mamba2 (trained at L_train = 512) from its torch
checkpoint through `longmamba_jax.load`, builds a passkey prompt at 16x L_train, and prints what
vanilla and LongMamba answer, the true key and the time taken. Compiled programs are kept on
disk (`longmamba_jax.compile_cache`), so a second run skips compiling; --no-compile-cache
turns that off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from longmamba_jax import compile_cache
from longmamba_jax.demo import DEMO_DIR, demo_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longmamba_jax.demo",
                                     description="Passkey retrieval far beyond the training "
                                                 "context: vanilla vs LongMamba.")
    parser.add_argument("--multiple", type=float, default=16.0,
                        help="prompt length as a multiple of L_train (default 16)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    parser.add_argument("--key", default=None, help="5-digit key (default: drawn from --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the key (default 0)")
    parser.add_argument("--filler", default=None, help="filler text file (default: bundled)")
    parser.add_argument("--backend", default="auto")
    compile_cache.add_cli_option(parser)
    args = parser.parse_args(argv)
    compile_cache.setup_from_args(args)

    import jax

    t0 = time.time()
    demo = demo_model()
    key = args.key or str(np.random.default_rng(args.seed).integers(10_000, 100_000))
    text = Path(args.filler or DEMO_DIR / "filler.txt").read_text(encoding="utf-8")
    n = int(round(args.multiple * demo.train_len))
    try:
        prompt = demo.passkey_prompt(key, text, n, args.depth)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"model: byte-level Mamba2, {demo.params.config.n_layer} layers, "
          f"{sum(int(x.size) for x in jax.tree.leaves(demo.params.weights)):,} "
          f"parameters, trained at L_train = {demo.train_len} tokens (loaded in "
          f"{time.time() - t0:.1f}s)")
    print(f"prompt: {len(prompt):,} tokens ({len(prompt) / demo.train_len:g}x L_train), "
          f"needle at depth {args.depth:g}")
    print(f"true key:  {key}")
    for name, method in (("vanilla", None), ("LongMamba", demo.longmamba())):
        t = time.time()
        got = demo.answer(prompt, method, backend=args.backend)
        mark = "correct" if got == key else "wrong"
        print(f"{name:>9}: {got or '(no digits)':<5}  {mark:<7}  ({time.time() - t:.1f}s)")
    print(f"total time: {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
