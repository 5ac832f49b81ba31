"""Running a short training: several seeds trained together (their `TrainState`s stacked, one
`vmap`ped step), a step count fitted to a time budget, resumable Orbax checkpoints
(OUT/ckpt, `longmamba_jax.training.save_checkpoint`), logs (OUT/train_log.jsonl), then the
export (OUT/model: mamba_ssm native torch layout, bf16 safetensors, via `export_torch`) and the
LongMamba calibration of the exported model (OUT/calibration.npz, on `calib_windows`
training-format prompts of exactly `train_len`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.short_train.train_config import TrainConfig, build_model_config
from longmamba_evals.short_train.train_data import BatchSource, TaskSampler, pad_rows, split_text
from longmamba_evals.short_train.train_model import (
    init_state,
    lr_at,
    make_steps,
    set_lr,
    stack_trees,
    unstack_tree,
)
from longmamba_jax import training
from longmamba_jax.model import Params

__all__ = ["export_and_calibrate", "recalibrate", "train", "train_seeds"]


def _save(step: int, state, meta: dict, out: Path) -> None:
    training.save_checkpoint(out / "ckpt", state)
    (out / "ckpt" / "meta.json").write_text(json.dumps(meta, indent=2))


def _log(out: Path | None, record: dict, quiet: bool = False) -> None:
    line = json.dumps(record)
    if out is not None:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(line + "\n")
    if not quiet:
        print(line, flush=True)


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


def _fit_budget(tc: TrainConfig, sampler: TaskSampler, train_step, eval_step, state,
                val_batches, n_seeds: int, t0: float, log) -> int:
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
            throwaway = jax.block_until_ready(set_lr(copy(state), 0.0))
            t = time.time()
            jax.block_until_ready(train_step(throwaway, batch))
            times.append(time.time() - t)
        step_time[b] = float(np.median(times[1:]))
    for _ in range(2):  # compile, then time
        t = time.time()
        jax.block_until_ready([eval_step(state.params.weights, v) for v in val_batches])
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

    train_step, eval_step, optimizer = make_steps(tc, config)
    inits = [init_state(tc, config, s, optimizer) for s in seeds]
    n_params = sum(int(x.size) for x in jax.tree.leaves(inits[0].params.weights))

    restored = [training.restore_checkpoint(o / "ckpt", i) for o, i in zip(outs, inits,
                                                                           strict=True)]
    total, start = tc.steps, 0
    if any(r is not None for r in restored):
        steps_done = [None if r is None else int(r.step) for r in restored]
        if len(set(steps_done)) != 1:
            raise ValueError(f"cannot resume seeds {seeds} together: their checkpoints are at "
                             f"steps {steps_done}")
        start = steps_done[0]
        state = stack_trees(restored)
        totals = {int(json.loads((o / "ckpt" / "meta.json").read_text())["total_steps"])
                  for o in outs}
        if len(totals) != 1:
            raise ValueError(f"cannot resume seeds {seeds} together: total steps {totals}")
        total = totals.pop()
        for o in outs:
            _log(o, {"event": "resume", "step": start, "total_steps": total}, quiet)
    else:
        state = stack_trees(inits)
        for s, o in zip(seeds, outs, strict=True):
            _log(o, {"event": "start", "params": n_params, "arch": tc.arch, "seed": s,
                     "seeds_in_process": seeds, "device": str(jax.devices()[0]),
                     "config": config.to_dict()}, quiet)
    del inits, restored
    source = BatchSource(tcs, train_text, data_workers)
    source.prefetch(start, total)  # workers start while the steps compile

    def log_all(records):  # one record per seed; printed for the first seed only
        for i, (o, r) in enumerate(zip(outs, records, strict=True)):
            _log(o, r, quiet=quiet or i > 0)

    S = range(len(seeds))

    t0 = time.time()
    if start == 0 and tc.time_budget_s is not None:
        total = _fit_budget(tc, source.samplers[0], train_step, eval_step, state,
                            [val_batch, val_lm], len(seeds), t0, lambda r: log_all([r for _ in S]))
    step = start
    try:
        while step < total and (stop_after is None or step < stop_after):
            batch = source.get(step, total)
            lr = lr_at(tc, step, total)
            state, metrics = train_step(set_lr(state, lr), batch)
            step += 1
            if step % tc.log_every == 0 or step == total:
                m = {k: np.asarray(v) for k, v in metrics.items()}
                el = round(time.time() - t0, 1)
                log_all([{"step": step, "seed": seeds[i], "lr": round(lr, 6), "elapsed_s": el,
                          **{k: round(float(v[i]), 4) for k, v in m.items()}} for i in S])
            if step % tc.val_every == 0 or step == total:
                weights = state.params.weights
                v = {k: np.asarray(x) for k, x in eval_step(weights, val_batch).items()}
                v_lm = {k: np.asarray(x) for k, x in eval_step(weights, val_lm).items()}
                log_all([{"step": step, "seed": seeds[i],
                          "val_passkey_acc": round(float(v["passkey_acc"][i]), 4),
                          "val_answer_loss": round(float(v["answer_loss"][i]), 4),
                          "val_lm_bpb": round(float(v_lm["lm_loss"][i]) / math.log(2), 4)}
                         for i in S])
            if step % tc.ckpt_every == 0 or step == total or step == stop_after:
                for i, o in enumerate(outs):
                    _save(step, unstack_tree(state, i), {"total_steps": total, "step": step}, o)
    finally:
        source.close()
    el = round(time.time() - t0, 1)
    for o in outs:
        _log(o, {"event": "done", "step": step, "total_steps": total, "train_time_s": el},
             quiet=True)
    _log(None, {"event": "done", "seeds": seeds, "step": step, "total_steps": total,
                "train_time_s": el}, quiet)
    return [Params(unstack_tree(state.params.weights, i), config) for i in range(len(seeds))]


def export_and_calibrate(params: Params, tc: TrainConfig, out: str | os.PathLike, *,
                         backend: str = "associative", storage: str = "auto",
                         quiet: bool = False):
    """Writes OUT/model (native torch layout, bf16) and OUT/calibration.npz (calibrated on the
    re-loaded export, i.e. exactly the shipped model). Returns (loaded params, calibration)."""
    from longmamba_jax.checkpoints.export import export_torch

    out = Path(out)
    export_torch(params.astype(jnp.bfloat16), out / "model", layout="native", force=True)
    loaded = lmj.load(out / "model")
    return loaded, _calibrate_run(loaded, tc, out, backend=backend, storage=storage, quiet=quiet)


def recalibrate(out: str | os.PathLike, *, backend: str = "associative",
                storage: str = "auto", quiet: bool = False):
    """Calibrates the exported model of the run in OUT again, on the same windows as its
    first calibration (its own train_config.json), and overwrites OUT/calibration.npz: e.g.
    with ``storage="exact"``, which the `alpha` and `offline` rules need."""
    out = Path(out)
    cfg_path = out / "train_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{out} has no train_config.json (not a training run)")
    saved = json.loads(cfg_path.read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    return _calibrate_run(lmj.load(out / "model"), tc, out, backend=backend, storage=storage,
                         quiet=quiet)


def _calibrate_run(loaded: Params, tc: TrainConfig, out: Path, *, backend: str, storage: str,
                  quiet: bool):
    """Calibrates `loaded` on `calib_windows` training-format windows and writes
    OUT/calibration.npz (atomically: a failure leaves the previous file)."""
    with open(tc.text, encoding="utf-8") as f:
        train_text, _ = split_text(f.read(), tc.val_frac)
    stream = TaskSampler(tc, train_text).calibration_stream(tc.calib_windows)
    cal = lmj.calibrate(loaded, stream, train_len=tc.train_len, num_windows=tc.calib_windows,
                        backend=backend, progress=False, storage=storage)
    cal.save(out / "calibration.npz")
    glob = cal.global_channels(0.05)
    _log(out, {"event": "calibrated", "global_channels_per_layer":
               [int(np.sum(g)) for g in glob],
               "decay_fraction_max_per_layer":
               [round(float(np.max(f)), 4) for f in cal.decay_fraction],
               "storage": cal.storage}, quiet)
    return cal
