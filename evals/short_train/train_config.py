"""The settings of a short-training run (`TrainConfig`, saved as OUT/train_config.json) and the
model config they define (byte vocabulary: 256 bytes + EOS)."""

from __future__ import annotations

import dataclasses
import os

import longmamba_jax as lmj
from longmamba_evals.tasks.text import DATA_DIR
from longmamba_jax.tokenizer import ByteTokenizer

__all__ = ["TRAIN_TEXT", "TrainConfig", "build_model_config"]

# The LAMBADA novel text after the part kept as `lambada_excerpt.txt`, so the evaluation's
# default filler is never trained on.
TRAIN_TEXT = os.path.join(DATA_DIR, "lambada_train.txt")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as OUT/train_config.json)."""

    arch: str = "mamba2"
    d_model: int = 384
    n_layer: int = 6
    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    chunk_size: int = 256
    train_len: int = 512
    tokens_per_step: int = 32_768
    bucket: int = 256
    steps: int = 3000
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    curriculum_frac: float = 0.2
    phase1_filler: int = 144
    instruction_prob: float = 0.5
    lm_frac: float = 0.1
    w_answer: float = 1.0
    w_second: float = 0.5
    w_lm: float = 0.1
    compute_dtype: str = "bfloat16"
    scan_backend: str = "associative"
    micro_batches: int = 1
    seed: int = 0
    val_frac: float = 0.05
    val_prompts: int = 128
    val_every: int = 250
    log_every: int = 50
    ckpt_every: int = 500
    time_budget_s: float | None = None
    calib_windows: int = 16
    text: str = TRAIN_TEXT

    def __post_init__(self):
        if self.arch not in ("mamba2", "mamba1"):
            raise ValueError(f"arch must be 'mamba2' or 'mamba1', got {self.arch!r}")
        if self.train_len % self.bucket:
            raise ValueError(f"train_len {self.train_len} must be a multiple of bucket "
                             f"{self.bucket}")
        if self.tokens_per_step < self.train_len:
            raise ValueError(f"tokens_per_step {self.tokens_per_step} < train_len "
                             f"{self.train_len}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32, got "
                             f"{self.compute_dtype!r}")
        if self.scan_backend not in lmj.BACKENDS:
            raise ValueError(f"scan_backend must be one of {lmj.BACKENDS}, got "
                             f"{self.scan_backend!r}")
        rows = [self.tokens_per_step // b for b in range(self.bucket, self.train_len + 1,
                                                          self.bucket)]
        if self.micro_batches < 1 or any(r % self.micro_batches for r in rows):
            raise ValueError(f"micro_batches {self.micro_batches} must divide the rows of every "
                             f"bucket ({rows})")
        if not 0 <= self.instruction_prob <= 1 or not 0 <= self.lm_frac < 1:
            raise ValueError("instruction_prob must be in [0, 1] and lm_frac in [0, 1)")


def build_model_config(tc: TrainConfig):
    """The model config of a run (byte vocabulary: 256 bytes + EOS)."""
    vocab = ByteTokenizer().vocab_size
    if tc.arch == "mamba2":
        return lmj.Mamba2Config(d_model=tc.d_model, n_layer=tc.n_layer, vocab_size=vocab,
                                d_state=tc.d_state, headdim=tc.headdim, expand=tc.expand,
                                chunk_size=tc.chunk_size)
    return lmj.MambaConfig(d_model=tc.d_model, n_layer=tc.n_layer, vocab_size=vocab,
                           d_state=tc.d_state, expand=tc.expand)
