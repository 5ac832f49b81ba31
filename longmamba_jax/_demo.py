"""Implementation of `longmamba_jax.demo` (kept apart so that `import longmamba_jax` does not
import the module `python -m longmamba_jax.demo` runs).

The bundled demo: a 5.8M-parameter byte-level Mamba2 trained at L_train = 512 bytes for passkey
retrieval, with its LongMamba calibration (see `data/demo/README.md` for how it was made).

    python -m longmamba_jax.demo [--multiple 16] [--depth 0.5] [--key 12345 | --seed 0]

loads the bundled mamba_ssm-native torch checkpoint through `longmamba_jax.load`, builds a passkey
prompt at `multiple` × L_train bytes, and prints what vanilla and LongMamba answer.

In code:

    import longmamba_jax as lmj
    demo = lmj.demo_model()
    ids = demo.passkey_prompt("12345", text, n_tokens=16 * demo.train_len, depth=0.5)
    demo.answer(ids)                          # vanilla
    demo.answer(ids, method=demo.longmamba()) # LongMamba

Prompt format: `longmamba_jax.prompts` (the one the model was trained on, and the one the
evaluation suite uses). The answer is the first 5 digits of the greedy continuation.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from longmamba_jax.prompts import Filler, make_passkey_prompt, parse_answer

__all__ = ["DEMO_DIR", "DemoModel", "demo_model", "main"]

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


@dataclasses.dataclass
class DemoModel:
    """The bundled model.

    Attributes:
      params: `longmamba_jax.Params` (bf16), loaded from the bundled torch checkpoint.
      calibration: its LongMamba `Calibration`.
      tokenizer: `ByteTokenizer` (`encode(str) -> list[int]`, `decode(list[int]) -> str`).
      train_len: the training context L_train in tokens (bytes).
    """

    params: object
    calibration: object
    tokenizer: object
    train_len: int

    def passkey_prompt(self, key: str, filler: str, n_tokens: int, depth: float) -> np.ndarray:
        """The prompt's token ids (int32 [n_tokens]) in the format the model was trained on.

        Args:
          key: the 5-digit pass key.
          filler: text to draw the haystack from (its words, cycled if too short).
          n_tokens: exact prompt length in tokens.
          depth: where the needle goes, as a fraction of the filler, in [0, 1]; it is placed at
            the word boundary nearest to depth · (number of filler tokens).
        """
        prompt = make_passkey_prompt(self.tokenizer, Filler.from_text(self.tokenizer, filler),
                                     int(n_tokens), float(depth), key)
        return prompt.tokens.astype(np.int32)

    def longmamba(self, **kwargs):
        """`LongMamba` with this model's calibration (kwargs: channel_threshold, scale, ...)."""
        from longmamba_jax.methods import LongMamba

        return LongMamba(self.calibration, **kwargs)

    def answer(self, prompt_ids, method=None, *, backend: str = "auto") -> str:
        """The first 5 digits of the greedy continuation ("" if no digit comes)."""
        import jax.numpy as jnp

        from longmamba_jax.generate import generate

        ids = jnp.asarray(np.asarray(prompt_ids, np.int32)[None])
        out = generate(self.params, ids, max_new_tokens=8, method=method, backend=backend)
        return parse_answer(self.tokenizer.decode(np.asarray(out[0]).tolist()))


def demo_model(path: str | Path | None = None) -> DemoModel:
    """Loads the bundled demo model (or a directory laid out like `data/demo`: `model/` holding
    a torch checkpoint, `calibration.npz`)."""
    from longmamba_jax.calibration import Calibration
    from longmamba_jax.loading import load
    from longmamba_jax.tokenizer import ByteTokenizer

    root = Path(path) if path is not None else DEMO_DIR
    if not (root / "model" / "config.json").is_file():
        raise FileNotFoundError(f"no demo model in {root} (expected model/config.json)")
    params = load(root / "model")
    cal = Calibration.load(root / "calibration.npz")
    cal.check_compatible(params.config.fingerprint, params.config.n_layer,
                         [params.config.channels] * params.config.n_layer)
    return DemoModel(params, cal, ByteTokenizer(), int(cal.train_len))


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
    args = parser.parse_args(argv)

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


