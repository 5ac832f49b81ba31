"""`fit`: the plain training loop (steps, a tqdm bar, a JSONL log, periodic checkpoints,
resume from the newest one)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from longmamba_jax.progress import progress_bar
from longmamba_jax.training.checkpoint import restore_checkpoint, save_checkpoint
from longmamba_jax.training.step import TrainState

__all__ = ["fit"]


def fit(step_fn: Callable, state: TrainState, batches: Callable[[int], dict], num_steps: int, *,
        log_path=None, log_every: int = 1, checkpoint_dir=None, checkpoint_every: int | None = None,
        progress: bool = True) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` until `state.step == num_steps`.

    Args:
      step_fn: from `make_train_step` (it may consume `state`'s buffers).
      state: the state to start from; with `checkpoint_dir` holding a checkpoint, the newest
        one replaces it (resume).
      batches: step -> batch (e.g. `TokenBatches(...).batch`), a pure function of the step, so
        a resumed run sees the batches the uninterrupted one saw.
      num_steps: total steps of the run (not steps still to take).
      log_path: a JSONL file; one line {"step", "time_s", metric: value} is appended every
        `log_every` steps and at the last.
      checkpoint_dir: where to save (every `checkpoint_every` steps, if given, and at the end)
        and resume from.
      progress: a tqdm bar with the latest loss.

    Returns:
      (final state, the logged records).
    """
    if checkpoint_dir is not None:
        state = restore_checkpoint(checkpoint_dir, state) or state
    start = int(state.step)
    records = []
    log = Path(log_path) if log_path is not None else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=num_steps, initial=start, enabled=progress, desc="train")
    t0 = time.perf_counter()
    for step in range(start, num_steps):
        state, metrics = step_fn(state, batches(step))
        done = step + 1
        if done % log_every == 0 or done == num_steps:
            values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
            record = {"step": done, "time_s": round(time.perf_counter() - t0, 3), **values}
            records.append(record)
            if log is not None:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if progress and "loss" in values:
                bar.set_postfix(loss=f"{values['loss']:.4f}")
        bar.update(1)
        if checkpoint_dir is not None and checkpoint_every and done % checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, state)
    bar.close()
    saved = checkpoint_every and num_steps % checkpoint_every == 0
    if checkpoint_dir is not None and num_steps > start and not saved:
        save_checkpoint(checkpoint_dir, state)
    return state, records
