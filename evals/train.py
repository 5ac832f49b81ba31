"""Train small byte-level Mamba2 / Mamba-1 models at a short context, for passkey retrieval.

The recipe that makes a few-million-parameter model learn retrieval in minutes (issue 9):

- **Passkey prompts in the evaluation's format** (`longmamba_evals.passkey.make_prompt`):
  instruction, filler, " The pass key is NNNNN. Remember it. NNNNN is the pass key.", filler,
  " What is the pass key? The pass key is", then the answer " NNNNN." appended. With probability
  `1 − instruction_prob` the instruction is left out, which gives shorter prompts and longer
  needle-to-question distances inside the same `train_len`.
- **Length curriculum** at constant tokens per step: for the first `curriculum_frac` of training
  the filler is at most `phase1_filler` tokens, then anything that fits in `train_len`.
- **Loss** (each term averaged over its own positions, then weighted):
      loss = w_answer · CE(answer digits) + w_second · CE(digits of the key's second occurrence
             in the needle) + w_lm · CE(every token)
  The second-occurrence term is a short-range copy that bootstraps the long-range one.
- **Language modeling** on LAMBADA text: the filler is LAMBADA text, and a fraction `lm_frac` of
  the full-length rows are plain text windows.

Rows are left-padded (with the model's mask, so padding never enters the state) to a few
bucket lengths (multiples of `bucket`), one bucket per step, so only a few shapes compile.
Initialisation follows mamba_ssm (Δ bias from log-uniform [1e-3, 0.1], A in [1, 16] for Mamba2,
out_proj scaled by 1/√n_layer). Parameters fp32, compute in bf16 (the parameters cast), the scan
in fp32. AdamW with warmup + cosine decay, gradient clipping at 1.

Text: `evals/data/lambada_train.txt` (the LAMBADA novel text after the part kept as
`lambada_excerpt.txt`, so the evaluation's default filler is never trained on); its last
`val_frac` is held out for validation (LM loss, teacher-forced passkey accuracy).

Resumable (Orbax checkpoints under OUT/ckpt; every step's batch is a function of (seed, step)),
so a resumed run continues identically. After training: OUT/model (mamba_ssm native torch
layout, bf16 safetensors, via `longmamba_jax.export_torch`) and OUT/calibration.npz
(LongMamba, calibrated on `calib_windows` training-format prompts of exactly `train_len`).

    python -m longmamba_evals.train --arch mamba2 --steps 3000 --out runs/m2 [--time-budget-s 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import longmamba_jax as lmj
from longmamba_evals.tasks.passkey import INSTRUCTION, NEEDLE, QUESTION, make_prompt
from longmamba_evals.tasks.text import DATA_DIR, Filler
from longmamba_jax.model import Params, apply_model
from longmamba_jax.tokenizer import ByteTokenizer

__all__ = ["TrainConfig", "Batch", "TaskSampler", "build_model_config", "mamba_init",
           "train", "export_and_calibrate", "main"]

TRAIN_TEXT = os.path.join(DATA_DIR, "lambada_train.txt")
ANSWER = " {key}."
BUCKET_STREAM = 0xB0C  # seeds the per-step bucket choice, shared by all seeds
f32, bf16 = jnp.float32, jnp.bfloat16


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
        if self.scan_backend not in ("associative", "reference"):
            raise ValueError(f"scan_backend must be 'associative' or 'reference' (the ones "
                             f"with gradients), got {self.scan_backend!r}")
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


# ----------------------------------------------------------------------------------------------
# Initialisation


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, f32, -bound, bound)


def _inv_softplus_dt(key, shape, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """mamba_ssm's Δ bias: dt log-uniform in [dt_min, dt_max], bias = softplus⁻¹(dt)."""
    u = jax.random.uniform(key, shape, f32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)),
                     floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def mamba_init(config, seed: int) -> Params:
    """fp32 parameters initialised as mamba_ssm does (torch Linear/Conv1d defaults, Δ bias,
    A, D = 1, out_proj / √n_layer, embedding N(0, 0.02))."""
    base = lmj.init_params(config, seed=seed, dtype=f32)
    w = jax.tree.map(lambda a: a, base.weights)
    mixer = dict(w["layers"]["mixer"])
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    L = config.n_layer

    def linear(name, extra_scale=1.0):
        k = mixer[name]["kernel"]  # [L, in, out]
        mixer[name] = {**mixer[name],
                       "kernel": _uniform(next(keys), k.shape, 1 / math.sqrt(k.shape[1]))
                       * extra_scale}

    linear("in_proj")
    linear("out_proj", 1 / math.sqrt(L))
    conv = mixer["conv1d"]
    bound = 1 / math.sqrt(conv["kernel"].shape[1])  # depthwise: fan_in = d_conv
    mixer["conv1d"] = {"kernel": _uniform(next(keys), conv["kernel"].shape, bound),
                       "bias": _uniform(next(keys), conv["bias"].shape, bound)}
    mixer["D"] = jnp.ones_like(mixer["D"])
    if isinstance(config, lmj.Mamba2Config):
        h = config.nheads
        mixer["dt_bias"] = _inv_softplus_dt(next(keys), (L, h))
        mixer["A_log"] = jnp.log(jax.random.uniform(next(keys), (L, h), f32, 1.0, 16.0))
    else:
        linear("x_proj")
        r = config.dt_rank
        dtp = mixer["dt_proj"]
        mixer["dt_proj"] = {"kernel": _uniform(next(keys), dtp["kernel"].shape, r ** -0.5),
                            "bias": _inv_softplus_dt(next(keys), dtp["bias"].shape)}
    w["layers"] = {**w["layers"], "mixer": mixer}
    return Params(w, config)


def decay_mask(weights):
    """Weight decay on matmul / conv kernels and the embedding only."""
    def leaf(path, _):
        names = [getattr(p, "key", "") for p in path]
        return names[-1] == "kernel" or names[:1] == ["embedding"]
    return jax.tree_util.tree_map_with_path(leaf, weights)


# ----------------------------------------------------------------------------------------------
# Data


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
        return {k: jnp.asarray(v) for k, v in dataclasses.asdict(self).items()}


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


# ----------------------------------------------------------------------------------------------
# Loss and steps


def _forward(weights, config, batch, tc: TrainConfig):
    params = Params(jax.tree.map(lambda a: a.astype(tc.compute_dtype), weights), config)
    logits = apply_model(params, batch["tokens"], mask=batch["mask"],
                         backend=lmj.resolve_backend(tc.scan_backend)).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, L-1, V] fp32
    labels = batch["tokens"][:, 1:]
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, L-1]
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    return ce, pred == labels


def _mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


LOSS_TERMS = ("answer", "second", "lm")


def loss_terms(weights, config, batch, tc: TrainConfig, counts: dict | None = None):
    """(total loss, {term: value}); masks are per position t (predicting t + 1).

    Each term is Σ ce·mask / count, count = the term's positions in the whole step's batch
    (`counts`, default: this batch's), so the losses of micro-batches add up to the step's."""
    ce, _ = _forward(weights, config, batch, tc)
    m = {k: batch[k][:, :-1] for k in LOSS_TERMS}
    if counts is None:
        counts = {k: jnp.maximum(jnp.sum(m[k]), 1.0) for k in m}
    terms = {k: jnp.sum(ce * m[k]) / counts[k] for k in m}
    loss = tc.w_answer * terms["answer"] + tc.w_second * terms["second"] + tc.w_lm * terms["lm"]
    return loss, terms


def make_optimizer(tc: TrainConfig):
    """AdamW without its learning rate (applied per step, so the schedule can be fixed late)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
    )


def lr_at(tc: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _step_key(tc: TrainConfig) -> TrainConfig:
    """tc without the fields the compiled steps do not depend on (one compile for all seeds)."""
    return dataclasses.replace(tc, seed=0, steps=0, time_budget_s=None)


def make_steps(tc: TrainConfig, config):
    """(train_step, eval_step, optimizer), jitted and vmapped over a leading seed axis S:

        train_step(weights [S, ...], opt_state [S, ...], batch {k: [S, B, L]}, lr)
            -> (weights, opt_state, metrics {k: [S]})
        eval_step(weights [S, ...], batch {k: [B, L]}) -> metrics {k: [S]}

    Cached, so runs with equal settings in one process (a resume, the tests) compile once."""
    return _make_steps(_step_key(tc), config)


@functools.lru_cache(maxsize=8)
def _make_steps(tc: TrainConfig, config):
    optimizer = make_optimizer(tc)
    k = tc.micro_batches

    def grads(weights, batch):
        vg = jax.value_and_grad(loss_terms, has_aux=True)
        if k == 1:
            (loss, terms), g = vg(weights, config, batch, tc)
            return loss, terms, g
        counts = {n: jnp.maximum(jnp.sum(batch[n][:, :-1]), 1.0) for n in LOSS_TERMS}
        # [B, L] -> [k, B/k, L]: one micro-batch per scan step, gradients summed
        micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)

        def body(acc, mb):
            (loss, terms), g = vg(weights, config, mb, tc, counts)
            return jax.tree.map(jnp.add, acc, (loss, terms, g)), None

        zero = (jnp.zeros((), f32), {n: jnp.zeros((), f32) for n in LOSS_TERMS},
                jax.tree.map(jnp.zeros_like, weights))
        (loss, terms, g), _ = jax.lax.scan(body, zero, micro)
        return loss, terms, g

    def train_step(weights, opt_state, batch, lr):
        loss, terms, g = grads(weights, batch)
        updates, opt_state = optimizer.update(g, opt_state, weights)
        weights = jax.tree.map(lambda w, u: w - lr * u, weights, updates)
        return weights, opt_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(g)}

    def eval_step(weights, batch):
        ce, hit = _forward(weights, config, batch, tc)
        # exact match = the " " and all 5 digits right (positions P-1 .. P+4)
        ans = batch["answer"][:, :-1]
        span = jnp.maximum(ans, jnp.pad(ans[:, 1:], ((0, 0), (0, 1))))
        correct = jnp.all(jnp.where(span > 0, hit, True), axis=-1)
        return {"passkey_acc": jnp.mean(correct.astype(f32)),
                "answer_loss": _mean(ce, ans), "lm_loss": _mean(ce, batch["lm"][:, :-1])}

    return (jax.jit(jax.vmap(train_step, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1)),
            jax.jit(jax.vmap(eval_step, in_axes=(0, None))), optimizer)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _manager(out: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (out / "ckpt").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                             enable_async_checkpointing=False))


def _save(mgr, step: int, weights, opt_state, meta: dict, out: Path):
    import orbax.checkpoint as ocp

    state = {"weights": weights, "opt": jax.tree.leaves(opt_state)}
    mgr.save(step, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
    (out / "ckpt" / "meta.json").write_text(json.dumps(meta, indent=2))


def _restore(mgr, weights, opt_state):
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return None
    leaves, treedef = jax.tree.flatten(opt_state)
    target = {"weights": weights, "opt": leaves}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    return step, state["weights"], jax.tree.unflatten(treedef, state["opt"])


# ----------------------------------------------------------------------------------------------
# Training


def _log(out: Path | None, record: dict, quiet: bool = False) -> None:
    line = json.dumps(record)
    if out is not None:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(line + "\n")
    if not quiet:
        print(line, flush=True)


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def _check_or_write_config(tc: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    mine = json.loads(json.dumps(dataclasses.asdict(tc)))
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        free = ("time_budget_s", "steps", "micro_batches")  # may change on resume
        defaults = dataclasses.asdict(TrainConfig())  # fields older runs did not record
        diff = {k for k in mine if k not in free and saved.get(k, defaults[k]) != mine[k]}
        if diff:
            raise ValueError(f"{out} holds a run with different settings: {sorted(diff)}")
    cfg_path.write_text(json.dumps(mine, indent=2))


_WORKER_SAMPLERS: dict = {}


def _worker_init(configs: list[dict], text: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"  # data workers never touch the accelerator
    for c in configs:
        _WORKER_SAMPLERS[c["seed"]] = TaskSampler(TrainConfig(**c), text)


def _worker_batch(seed: int, step: int, total: int) -> Batch:
    return _WORKER_SAMPLERS[seed].batch(step, total)


class _BatchSource:
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
        return {k: jnp.asarray(np.stack([f[k] for f in fields])) for k in fields[0]}

    def close(self) -> None:
        if self.pool is not None:
            for _, futures in self.pending.values():
                for f in futures:
                    f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _fit_budget(tc: TrainConfig, sampler: TaskSampler, train_step, eval_step, weights,
                opt_state, val_batches, n_seeds: int, t0: float, log) -> int:
    """The step count that fits `tc.time_budget_s` (counted from t0), at most `tc.steps`.

    Compiles the step of every bucket and the validation, times each (on throwaway copies of
    the state), then takes the largest n whose steps (each step's bucket is known in advance:
    `step_bucket(step, n)`) and validations add up to 97% of the time left."""
    copy = lambda t: jax.tree.map(jnp.copy, t)
    step_time = {}
    for b in sampler.buckets:
        if b < sampler.fixed[False] and b < tc.train_len:
            continue  # no row is that short
        rows = [sampler.text_window(np.random.default_rng(0), b)] * (tc.tokens_per_step // b)
        one = pad_rows(rows, b).as_jax()
        batch = {k: jnp.stack([v] * n_seeds) for k, v in one.items()}
        times = []
        for _ in range(4):  # the first one compiles
            w, o = copy(weights), copy(opt_state)
            jax.block_until_ready((w, o))
            t = time.time()
            jax.block_until_ready(train_step(w, o, batch, jnp.float32(0.0)))
            times.append(time.time() - t)
        step_time[b] = float(np.median(times[1:]))
    for _ in range(2):  # compile, then time
        t = time.time()
        jax.block_until_ready([eval_step(weights, v) for v in val_batches])
        val_time = time.time() - t
    remaining = 0.97 * (tc.time_budget_s - (time.time() - t0))

    def cost(n):
        steps = sum(step_time.get(sampler.step_bucket(s, n), max(step_time.values()))
                    for s in range(n))
        return steps + val_time * sum(1 for s in range(1, n + 1)
                                      if s % tc.val_every == 0 or s == n)

    lo, hi = 1, tc.steps
    if cost(hi) <= remaining:
        lo = hi
    while lo < hi:  # the largest n with cost(n) <= remaining
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= remaining else (lo, mid - 1)
    log({"event": "budget", "step_time_s": {str(b): round(t, 4) for b, t in step_time.items()},
         "val_time_s": round(val_time, 3), "seeds_in_process": n_seeds,
         "compile_and_timing_s": round(time.time() - t0, 1), "total_steps": lo,
         "predicted_train_s": round(cost(lo), 1)})
    return lo


def train(tc: TrainConfig, out: str | os.PathLike, *, stop_after: int | None = None,
          quiet: bool = False, data_workers: int = 0) -> Params:
    """Trains (or resumes) the run of seed `tc.seed` in `out`; returns the fp32 `Params`.

    Args:
      tc: the run's settings.
      out: run directory (checkpoints, logs, config).
      stop_after: stop (and checkpoint) after this many steps in total, as if interrupted.
      quiet: no printing (logs still go to OUT/train_log.jsonl).
      data_workers: processes that build batches ahead (0: built inline).
    """
    return train_seeds(tc, [tc.seed], [out], stop_after=stop_after, quiet=quiet,
                       data_workers=data_workers)[0]


def train_seeds(tc: TrainConfig, seeds, outs, *, stop_after: int | None = None,
                quiet: bool = False, data_workers: int = 0) -> list[Params]:
    """Trains the runs of several seeds together: parameters and optimizer states stacked on a
    leading axis, one `vmap`ped step. Run i is exactly the single-seed run of `seeds[i]` (its
    init, its batches, the shared schedule) and lives in `outs[i]` (resumable one by one or
    together). Returns the fp32 `Params` of each run.

    With `tc.time_budget_s`, the step count is fixed from the step time measured on the
    vmapped step, the same for every seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(seeds) != len(outs):
        raise ValueError(f"need one output directory per seed, got seeds {seeds} and "
                         f"{len(outs)} directories")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    outs = [Path(o) for o in outs]
    if len({o.resolve() for o in outs}) != len(outs):
        raise ValueError(f"output directories must be distinct, got {[str(o) for o in outs]}")
    tcs = [dataclasses.replace(tc, seed=s) for s in seeds]
    config = build_model_config(tc)
    for t, o in zip(tcs, outs, strict=True):
        _check_or_write_config(t, o)
    with open(tc.text, encoding="utf-8") as f:
        train_text, val_text = split_text(f.read(), tc.val_frac)
    val_sampler = TaskSampler(tc, val_text)
    val_batch = val_sampler.validation(tc.val_prompts).as_jax()
    lm_rows = [val_sampler.text_window(np.random.default_rng(i), tc.train_len)
               for i in range(32)]
    val_lm = pad_rows(lm_rows, tc.train_len).as_jax()

    inits = [mamba_init(config, s).weights for s in seeds]
    train_step, eval_step, optimizer = make_steps(tc, config)
    opt_inits = [optimizer.init(w) for w in inits]
    n_params = sum(int(x.size) for x in jax.tree.leaves(inits[0]))

    mgrs = [_manager(o) for o in outs]
    restored = [_restore(m, w, s) for m, w, s in zip(mgrs, inits, opt_inits, strict=True)]
    total, start = tc.steps, 0
    if any(r is not None for r in restored):
        steps_done = {None if r is None else r[0] for r in restored}
        if len(steps_done) != 1:
            raise ValueError(f"cannot resume seeds {seeds} together: their checkpoints are at "
                             f"steps {[None if r is None else r[0] for r in restored]}")
        start = steps_done.pop()
        weights, opt_state = _stack([r[1] for r in restored]), _stack([r[2] for r in restored])
        totals = {int(json.loads((o / "ckpt" / "meta.json").read_text())["total_steps"])
                  for o in outs}
        if len(totals) != 1:
            raise ValueError(f"cannot resume seeds {seeds} together: total steps {totals}")
        total = totals.pop()
        for o in outs:
            _log(o, {"event": "resume", "step": start, "total_steps": total}, quiet)
    else:
        weights, opt_state = _stack(inits), _stack(opt_inits)
        for s, o in zip(seeds, outs, strict=True):
            _log(o, {"event": "start", "params": n_params, "arch": tc.arch, "seed": s,
                     "seeds_in_process": seeds, "device": str(jax.devices()[0]),
                     "config": config.to_dict()}, quiet)
    del inits, opt_inits, restored
    source = _BatchSource(tcs, train_text, data_workers)
    source.prefetch(start, total)  # workers start while the steps compile

    def log_all(records):  # one record per seed; printed for the first seed only
        for i, (o, r) in enumerate(zip(outs, records, strict=True)):
            _log(o, r, quiet=quiet or i > 0)

    S = range(len(seeds))

    t0 = time.time()
    if start == 0 and tc.time_budget_s is not None:
        total = _fit_budget(tc, source.samplers[0], train_step, eval_step, weights, opt_state,
                            [val_batch, val_lm], len(seeds), t0, lambda r: log_all([r for _ in S]))
    step = start
    try:
        while step < total and (stop_after is None or step < stop_after):
            batch = source.get(step, total)
            lr = lr_at(tc, step, total)
            weights, opt_state, metrics = train_step(weights, opt_state, batch,
                                                     jnp.float32(lr))
            step += 1
            if step % tc.log_every == 0 or step == total:
                m = {k: np.asarray(v) for k, v in metrics.items()}
                el = round(time.time() - t0, 1)
                log_all([{"step": step, "seed": seeds[i], "lr": round(lr, 6), "elapsed_s": el,
                          **{k: round(float(v[i]), 4) for k, v in m.items()}} for i in S])
            if step % tc.val_every == 0 or step == total:
                v = {k: np.asarray(x) for k, x in eval_step(weights, val_batch).items()}
                v_lm = {k: np.asarray(x) for k, x in eval_step(weights, val_lm).items()}
                log_all([{"step": step, "seed": seeds[i],
                          "val_passkey_acc": round(float(v["passkey_acc"][i]), 4),
                          "val_answer_loss": round(float(v["answer_loss"][i]), 4),
                          "val_lm_bpb": round(float(v_lm["lm_loss"][i]) / math.log(2), 4)}
                         for i in S])
            if step % tc.ckpt_every == 0 or step == total or step == stop_after:
                for i, (m, o) in enumerate(zip(mgrs, outs, strict=True)):
                    _save(m, step, _unstack(weights, i), _unstack(opt_state, i),
                          {"total_steps": total, "step": step}, o)
    finally:
        source.close()
        for m in mgrs:
            m.close()
    el = round(time.time() - t0, 1)
    for o in outs:
        _log(o, {"event": "done", "step": step, "total_steps": total, "train_time_s": el},
             quiet=True)
    _log(None, {"event": "done", "seeds": seeds, "step": step, "total_steps": total,
                "train_time_s": el}, quiet)
    return [Params(_unstack(weights, i), config) for i in range(len(seeds))]


def export_and_calibrate(params: Params, tc: TrainConfig, out: str | os.PathLike, *,
                         backend: str = "associative", quiet: bool = False):
    """Writes OUT/model (native torch layout, bf16) and OUT/calibration.npz (calibrated on the
    re-loaded export, i.e. exactly the shipped model). Returns (loaded params, calibration)."""
    from longmamba_jax.checkpoints.export import export_torch

    out = Path(out)
    export_torch(params.astype(bf16), out / "model", layout="native", force=True)
    loaded = lmj.load(out / "model")
    with open(tc.text, encoding="utf-8") as f:
        train_text, _ = split_text(f.read(), tc.val_frac)
    stream = TaskSampler(tc, train_text).calibration_stream(tc.calib_windows)
    cal = lmj.calibrate(loaded, stream, train_len=tc.train_len, num_windows=tc.calib_windows,
                        backend=backend, progress=False)
    cal.save(out / "calibration.npz")
    glob = cal.global_channels(0.05)
    _log(out, {"event": "calibrated", "global_channels_per_layer":
               [int(np.sum(g)) for g in glob],
               "decay_fraction_max_per_layer":
               [round(float(np.max(f)), 4) for f in cal.decay_fraction]}, quiet)
    return loaded, cal


def needle_report(params: Params, cal, *, lengths, text: str | None = None, n_prompts: int = 5,
                  channel_threshold: float = 0.05, backend: str = "associative") -> list[dict]:
    """Why LongMamba keeps or drops the key: per global channel and prompt length, Δ at the key's
    digits (both occurrences) vs the filler's median Δ, the threshold θ_S, and the fraction of key
    digits / filler tokens that the filter keeps (Δ > θ_S). Prompts in the evaluation's format on
    `text` (default: the evaluation's filler), depths spread over [0, 1]."""
    from longmamba_evals.tasks.text import load_text

    tok = ByteTokenizer()
    filler = Filler.from_text(tok, load_text(text))
    glob = cal.global_channels(channel_threshold)
    rows = []
    for length in lengths:
        rng = np.random.default_rng(length)
        prompts = [make_prompt(tok, filler, length, float(d), str(int(rng.integers(10_000,
                   100_000))), int(rng.integers(0, filler.n_units)))
                   for d in np.linspace(0, 1, n_prompts)]
        tokens = jnp.asarray(np.stack([p.tokens for p in prompts]), jnp.int32)
        dt = np.asarray(apply_model(params, tokens, capture_dt=True, last_n=1,
                                    backend=lmj.resolve_backend(backend)).dt)  # [L, b, l, C]
        theta = cal.thresholds(length) if length > cal.train_len else None
        key_pos, filler_mask = [], np.zeros((len(prompts), length), bool)
        for i, p in enumerate(prompts):
            needle = NEEDLE.format(key=p.key)
            first = needle.find(p.key)
            second = needle.find(p.key, first + len(p.key))
            key_pos.append([p.needle_pos + o + j for o in (first, second) for j in range(5)])
            n_instr = len(tok.encode(INSTRUCTION))
            filler_mask[i, n_instr:length - p.question_len] = True
            filler_mask[i, p.needle_pos:p.needle_pos + p.needle_len] = False
        key_pos = np.asarray(key_pos)  # [b, 10]
        for layer, g in enumerate(glob):
            for c in np.flatnonzero(g):
                d = dt[layer, :, :, c]  # [b, l]
                key = np.take_along_axis(d, key_pos, axis=1)
                fill = d[filler_mask]
                row = {"length": length, "layer": layer, "channel": int(c),
                       "decay_fraction": round(float(cal.decay_fraction[layer][c]), 4),
                       "key_dt_mean": float(key.mean()), "filler_dt_median": float(np.median(fill)),
                       "key_over_filler": float(key.mean() / max(np.median(fill), 1e-12))}
                if theta is not None:
                    t = float(theta[layer][c])
                    row.update(theta=t, key_kept=float((key > t).mean()),
                               filler_kept=float((fill > t).mean()))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m longmamba_evals.train",
                                description=__doc__.split("\n")[0])
    d = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        kind = {int: int, float: float, str: str}.get(type(default), float)
        p.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    p.add_argument("--out", required=True,
                   help="run directory; with several --seeds a pattern holding {seed}")
    p.add_argument("--seeds", default=None,
                   help="comma list: train these seeds together in one process (vmap over "
                        "seeds); overrides --seed")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes that build batches ahead (default 0: inline)")
    p.add_argument("--no-export", action="store_true", help="skip export and calibration")
    p.add_argument("--calib-backend", default="associative")
    p.add_argument("--diagnose", action="store_true",
                   help="only write OUT/needle_deltas.json for the run in OUT (Δ of key vs filler "
                        "in each global channel at 4x, 8x, 16x train_len)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        if args.diagnose:
            out = Path(args.out)
            params = lmj.load(out / "model")
            cal = lmj.Calibration.load(out / "calibration.npz")
            rows = needle_report(params, cal, lengths=[4 * cal.train_len, 8 * cal.train_len,
                                                       16 * cal.train_len],
                                 backend=args.calib_backend)
            (out / "needle_deltas.json").write_text(json.dumps(rows, indent=1))
            for r in rows:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items()))
            return 0
        seeds = ([int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds
                 else [tc.seed])
        if len(seeds) > 1 and "{seed}" not in args.out:
            raise ValueError(f"--out {args.out!r} must contain {{seed}} when training several "
                             "seeds")
        outs = [args.out.format(seed=s) for s in seeds]
        runs = train_seeds(tc, seeds, outs, data_workers=args.data_workers)
        if not args.no_export:
            for s, out, params in zip(seeds, outs, runs, strict=True):
                export_and_calibrate(params, dataclasses.replace(tc, seed=s), out,
                                     backend=args.calib_backend)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
