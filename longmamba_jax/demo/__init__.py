"""The bundled demo: a 5.8M-parameter byte-level Mamba2 trained at L_train = 512 bytes for passkey
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

import dataclasses
from pathlib import Path

import numpy as np

from longmamba_jax.prompts import Filler, make_passkey_prompt, parse_answer

__all__ = ["DEMO_DIR", "DemoModel", "demo_model"]

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


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
        from longmamba_jax.generation.generate import generate

        out = generate(self.params, np.asarray(prompt_ids, np.int32), max_new_tokens=8,
                       method=method, backend=backend)  # one prompt in, int32 [8] out
        return parse_answer(self.tokenizer.decode(np.asarray(out).tolist()))

    def __repr__(self) -> str:
        cal = self.calibration
        cal = f"Calibration({cal.n_layers} layers)" if hasattr(cal, "n_layers") else repr(cal)
        return (f"DemoModel({self.params!r}, tokenizer={self.tokenizer!r}, "
                f"train_len={self.train_len}, calibration={cal})")


def demo_model(path: str | Path | None = None) -> DemoModel:
    """Loads the bundled demo model (or a directory laid out like `data/demo`: `model/` holding
    a torch checkpoint, `calibration.npz`)."""
    from longmamba_jax.calibration import Calibration
    from longmamba_jax.checkpoints import load
    from longmamba_jax.tokenizer import ByteTokenizer

    root = Path(path) if path is not None else DEMO_DIR
    if not (root / "model" / "config.json").is_file():
        raise FileNotFoundError(f"no demo model in {root} (expected model/config.json)")
    from longmamba_jax.calibration.record import weights_digest

    params = load(root / "model")
    cal = Calibration.load(root / "calibration.npz")
    cal.check_compatible(params.config.fingerprint, params.config.n_layer,
                         [params.config.channels] * params.config.n_layer,
                         weights_digest(params))
    return DemoModel(params, cal, ByteTokenizer(), int(cal.train_len))
