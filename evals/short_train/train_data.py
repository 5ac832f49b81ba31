"""Training rows for the short runs: passkey prompts in the evaluation's format and LAMBADA text
windows, left-padded to bucket lengths, and a source that stacks every seed's batch.

- Passkey prompts (`longmamba_evals.tasks.passkey.make_prompt`): instruction, filler,
  " The pass key is NNNNN. Remember it. NNNNN is the pass key.", filler,
  " What is the pass key? The pass key is", then the answer " NNNNN." appended. With probability
  `1 − instruction_prob` the instruction is left out, which gives shorter prompts and longer
  needle-to-question distances inside the same `train_len`.
- Length curriculum at constant tokens per step: for the first `curriculum_frac` of training
  the filler is at most `phase1_filler` tokens, then anything that fits in `train_len`.
- Language modeling: the filler is LAMBADA text, and a fraction `lm_frac` of the full-length
  rows are plain text windows.
- Rows are left-padded (with the model's mask, so padding never enters the state) to a few
  bucket lengths (multiples of `bucket`), one bucket per step, so only a few shapes compile.
  Every step's batch is a pure function of (seed, step, total steps).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_evals.tasks.passkey import INSTRUCTION, NEEDLE, QUESTION, make_prompt
from longmamba_evals.tasks.text import Filler
from longmamba_jax.tokenizer import ByteTokenizer

__all__ = ["ANSWER", "Batch", "BatchSource", "Example", "TaskSampler", "pad_rows", "split_text"]

ANSWER = " {key}."
BUCKET_STREAM = 0xB0C  # seeds the per-step bucket choice, shared by all seeds


@dataclasses.dataclass
class Batch:
    """One step's rows, all [B, Lb]: tokens, mask (1 = real token), and per-position loss masks
    (position t is scored on predicting token t + 1)."""

    tokens: np.ndarray
    mask: np.ndarray
    answer: np.ndarray
    second: np.ndarray
    lm: np.ndarray

    def as_jax(self) -> dict:
        """The step's batch: the fields as jax arrays, `mask` under the model's name for it,
        "attention_mask"."""
        return {_KEYS.get(k, k): jnp.asarray(v) for k, v in dataclasses.asdict(self).items()}


_KEYS = {"mask": "attention_mask"}  # Batch field -> key of the training batch


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # [T]
    answer: np.ndarray  # [T] positions predicting the answer digits
    second: np.ndarray  # [T] positions predicting the needle's second key
    lm: np.ndarray  # [T]


def split_text(text: str, val_frac: float) -> tuple[str, str]:
    """(train, validation): the last `val_frac` of the words is held out."""
    words = text.split()
    if len(words) < 200:
        raise ValueError(f"training text has only {len(words)} words")
    cut = int(len(words) * (1 - val_frac))
    return " ".join(words[:cut]), " ".join(words[cut:])


class TaskSampler:
    """Draws training / validation rows. Every draw is a function of the rng passed in."""

    def __init__(self, tc: TrainConfig, text: str):
        self.tc = tc
        self.tok = ByteTokenizer()
        self.filler = Filler.from_text(self.tok, text)
        self.stream = self.filler.tokens
        if len(self.stream) < tc.train_len + 1:
            raise ValueError(f"text too short: {len(self.stream)} tokens")
        self.n_instr = len(self.tok.encode(INSTRUCTION))
        fixed = (len(self.tok.encode(NEEDLE.format(key="00000")))
                 + len(self.tok.encode(QUESTION)) + len(self.tok.encode(ANSWER.format(key="0"
                                                                                       * 5))))
        self.fixed = {True: fixed + self.n_instr, False: fixed}  # by "with instruction"
        if self.fixed[True] > tc.train_len:
            raise ValueError(f"train_len {tc.train_len} cannot hold a passkey prompt with its "
                             f"instruction ({self.fixed[True]} tokens)")
        self.buckets = [b for b in range(tc.bucket, tc.train_len + 1, tc.bucket)]

    def bucket_of(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def passkey(self, rng, filler_len: int, instruction: bool, key: str | None = None,
                depth: float | None = None) -> Example:
        """One prompt + answer with `filler_len` filler tokens."""
        key = key or str(int(rng.integers(10_000, 100_000)))
        depth = float(rng.random()) if depth is None else depth
        p = make_prompt(self.tok, self.filler, self.fixed[True] - len(ANSWER.format(key=key))
                        + filler_len, depth, key, int(rng.integers(0, self.filler.n_units)))
        cut = 0 if instruction else self.n_instr
        prompt = p.tokens[cut:]
        needle_pos = p.needle_pos - cut
        tokens = np.concatenate([prompt, self.tok.encode(ANSWER.format(key=key))])
        T = len(tokens)
        answer, second, lm = (np.zeros(T, np.float32) for _ in range(3))
        P = len(prompt)  # tokens[P] = " ", digits at P+1 .. P+5, predicted at P .. P+4
        answer[P:P + 5] = 1
        needle = NEEDLE.format(key=key)
        off = needle.find(key, needle.find(key) + len(key))  # bytes == chars here
        start = needle_pos + off  # first digit of the second occurrence
        second[start - 1:start + 4] = 1
        lm[:T - 1] = 1
        return Example(tokens.astype(np.int32), answer, second, lm)

    def text_window(self, rng, length: int) -> Example:
        start = int(rng.integers(0, len(self.stream) - length))
        tokens = self.stream[start:start + length].astype(np.int32)
        z = np.zeros(length, np.float32)
        lm = np.ones(length, np.float32)
        lm[-1] = 0
        return Example(tokens, z, z.copy(), lm)

    def _draw(self, rng, phase1: bool):
        """(kind, instruction, filler_len, total length) of one row."""
        tc = self.tc
        if rng.random() < tc.lm_frac:
            return ("lm", False, 0, tc.train_len)
        instr = bool(rng.random() < tc.instruction_prob)
        fmax = tc.train_len - self.fixed[instr]
        if phase1:
            fmax = min(fmax, tc.phase1_filler)
        n = int(rng.integers(0, fmax + 1))
        return ("passkey", instr, n, self.fixed[instr] + n)

    def step_bucket(self, step: int, total_steps: int) -> int:
        """The padded length of step `step`: the bucket of one row drawn from a stream that is
        the same for every seed, so the runs of several seeds have equal shapes at each step
        and train together under `vmap`. (The bucket has the distribution it would have if the
        seed's own first row chose it.)"""
        phase1 = step < self.tc.curriculum_frac * total_steps
        return self.bucket_of(self._draw(np.random.default_rng([BUCKET_STREAM, step]),
                                         phase1)[3])

    def batch(self, step: int, total_steps: int) -> Batch:
        """The rows of training step `step` (a pure function of (seed, step, total_steps))."""
        tc = self.tc
        phase1 = step < tc.curriculum_frac * total_steps
        bucket = self.step_bucket(step, total_steps)
        rng = np.random.default_rng([tc.seed, step])
        rows, rows_wanted = [], tc.tokens_per_step // bucket
        while len(rows) < rows_wanted:  # rows drawn conditionally on the step's bucket
            d = self._draw(rng, phase1)
            if self.bucket_of(d[3]) == bucket:
                rows.append(d)
        examples = [self.text_window(rng, total) if kind == "lm"
                    else self.passkey(rng, n, instr) for kind, instr, n, total in rows]
        return pad_rows(examples, bucket)

    def validation(self, n: int, seed: int = 12345) -> Batch:
        """`n` full-length prompts with the instruction (the evaluation's format), any depth."""
        rng = np.random.default_rng(seed)
        fmax = self.tc.train_len - self.fixed[True]
        ex = [self.passkey(rng, int(rng.integers(0, fmax + 1)), True) for _ in range(n)]
        return pad_rows(ex, self.tc.train_len)

    def calibration_stream(self, n_windows: int, seed: int = 777) -> np.ndarray:
        """`n_windows` training-format prompts (with instruction) of exactly train_len tokens,
        concatenated: windows of `calibrate(..., train_len, num_windows=n_windows)`."""
        rng = np.random.default_rng(seed)
        n = self.tc.train_len - self.fixed[True]
        return np.concatenate([self.passkey(rng, n, True).tokens for _ in range(n_windows)])


def pad_rows(examples: list[Example], length: int) -> Batch:
    """Left-pads examples to `length` (pad id 0, mask 0, no loss)."""
    B = len(examples)
    out = {k: np.zeros((B, length), np.float32) for k in ("mask", "answer", "second", "lm")}
    tokens = np.zeros((B, length), np.int32)
    for i, e in enumerate(examples):
        T = len(e.tokens)
        if T > length:
            raise ValueError(f"example of {T} tokens does not fit in {length}")
        tokens[i, length - T:] = e.tokens
        out["mask"][i, length - T:] = 1
        out["answer"][i, length - T:] = e.answer
        out["second"][i, length - T:] = e.second
        out["lm"][i, length - T:] = e.lm
    return Batch(tokens, **out)


_WORKER_SAMPLERS: dict = {}


def _worker_init(configs: list[dict], text: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"  # data workers never touch the accelerator
    for c in configs:
        _WORKER_SAMPLERS[c["seed"]] = TaskSampler(TrainConfig(**c), text)


def _worker_batch(seed: int, step: int, total: int) -> Batch:
    return _WORKER_SAMPLERS[seed].batch(step, total)


class BatchSource:
    """Each step's batch of every seed, stacked: {k: [S, B, L]}. With `workers` > 0 the rows
    are built ahead in worker processes (the same pure function of (seed, step, total))."""

    def __init__(self, tcs: list[TrainConfig], text: str, workers: int):
        self.tcs = tcs
        self.samplers = [TaskSampler(t, text) for t in tcs]
        self.pool = None
        self.pending: dict[int, tuple[int, list]] = {}
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # The workers must never open the accelerator (JAX would preallocate its memory in
            # each): they are all started now, under an environment that hides it.
            saved = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")}
            os.environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
            try:
                self.pool = ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=([dataclasses.asdict(t) for t in tcs], text))
                started = [self.pool.submit(os.getpid) for _ in range(workers)]
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            for f in started:  # up and running
                f.result()
            self.ahead = max(2, 2 * workers // len(tcs))

    def prefetch(self, step: int, total: int) -> None:
        """Submits the batches of steps step .. step + ahead (a no-op without workers)."""
        if self.pool is None:
            return
        for ahead in range(step, min(step + self.ahead, total)):
            made = self.pending.get(ahead)
            if made is None or made[0] != total:  # (re)submit when the schedule changed
                self.pending[ahead] = (total, [
                    self.pool.submit(_worker_batch, t.seed, ahead, total) for t in self.tcs])

    def get(self, step: int, total: int) -> dict:
        if self.pool is None:
            batches = [s.batch(step, total) for s in self.samplers]
        else:
            self.prefetch(step, total)
            batches = [f.result() for f in self.pending.pop(step)[1]]
        fields = [dataclasses.asdict(b) for b in batches]
        return {_KEYS.get(k, k): jnp.asarray(np.stack([f[k] for f in fields]))
                for k in fields[0]}

    def close(self) -> None:
        if self.pool is not None:
            for _, futures in self.pending.values():
                for f in futures:
                    f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
