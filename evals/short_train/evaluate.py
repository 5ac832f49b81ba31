"""Evaluates short-training runs (`train.py`), saving every result as soon as it is done.

For each run directory RUN (holding `model/`, `calibration.npz`, `train_config.json`), in this
order of priority:

1. passkey retrieval for each method (vanilla, LongMamba, DeciMamba) at 1×..32× L_train, all
   depths, `samples` keys per (length, depth)                     -> RUN/eval/passkey_*.json
2. the LongMamba diagnostics at 8× L_train and beyond: per global channel, Δ at the key's
   digits vs the filler's, θ_S, and the fraction of key digits / filler tokens the filter keeps
                                                                   -> RUN/needle_deltas.json
3. perplexity vs context on held-out text (the evaluation's LAMBADA excerpt, which training
   never sees), each method                                        -> RUN/eval/perplexity_*.json
4. optional LongMamba "levers" (other c_thr, b, or a calibration with another clamp ratio ρ)
                                                          -> RUN/levers/NAME/passkey_longmamba.json

No job starts after `--deadline` (a Unix time), so a run that is cut short keeps what finished.

    python -m longmamba_evals.short_train.evaluate RUN [RUN ...] --samples 20 [--levers c0.5:c=0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_evals.short_train.train_data import TaskSampler, split_text
from longmamba_evals.tasks.methods import MethodSpec, base_name
from longmamba_evals.tasks.outputs import save_run
from longmamba_evals.tasks.passkey import INSTRUCTION, NEEDLE, make_prompt, run_passkey
from longmamba_evals.tasks.perplexity import run_perplexity
from longmamba_evals.tasks.runner import LMRunner
from longmamba_evals.tasks.text import Filler, load_text
from longmamba_jax.model import Params, apply_model
from longmamba_jax.tokenizer import ByteTokenizer

__all__ = ["Lever", "evaluate_run", "main", "needle_report", "parse_lever"]

MULTIPLES = (1, 2, 4, 8, 16, 32)
LEVER_KEYS = {"c": "channel_threshold", "b": "scale", "rho": "clamp_top"}


@dataclasses.dataclass(frozen=True)
class Lever:
    """A LongMamba variant: c_thr, b, and/or a re-calibration with clamp ratio ρ."""

    name: str
    channel_threshold: float = 0.05
    scale: float = 1.0
    clamp_top: float | None = None  # None: the run's calibration


def parse_lever(spec: str) -> Lever:
    """"NAME:c=0.5,b=0.5,rho=0.2" -> Lever (c = c_thr, b = scale, rho = clamp ratio)."""
    name, _, rest = spec.partition(":")
    if not name or not rest:
        raise ValueError(f"lever {spec!r}: expected NAME:key=value[,key=value] with keys "
                         f"{sorted(LEVER_KEYS)}")
    kw = {}
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key not in LEVER_KEYS:
            raise ValueError(f"lever {spec!r}: unknown key {key!r}; use {sorted(LEVER_KEYS)}")
        kw[LEVER_KEYS[key]] = float(value)
    return Lever(name, **kw)


class _Clock:
    def __init__(self, deadline: float | None, log):
        self.deadline, self.log = deadline, log

    def ok(self, what: str) -> bool:
        if self.deadline is not None and time.time() > self.deadline:
            self.log(f"skipped (deadline): {what}")
            return False
        return True


def needle_report(params: Params, cal, *, lengths, text: str | None = None, n_prompts: int = 5,
                  channel_threshold: float = 0.05, backend: str = "associative") -> list[dict]:
    """Why LongMamba keeps or drops the key: per global channel and prompt length, Δ at the key's
    digits (both occurrences) vs the filler's median Δ, the threshold θ_S, and the fraction of key
    digits / filler tokens that the filter keeps (Δ > θ_S). Prompts in the evaluation's format on
    `text` (default: the evaluation's filler), depths spread over [0, 1]."""
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


def evaluate_run(run: str | Path, *, samples: int = 20, lengths=None, batch_size: int = 50,
                 backend: str = "associative", methods=("vanilla", "longmamba", "decimamba"),
                 diagnose_prompts: int = 10, perplexity: bool = True, ppl_windows: int = 10,
                 ppl_text: str | None = None, levers=(), lever_multiples=(8, 16, 32),
                 lever_samples: int = 10, deadline: float | None = None, quiet: bool = True):
    """Runs the jobs above on one run directory (see the module docstring)."""
    run = Path(run)
    t0 = time.time()

    def log(msg):
        print(f"[{run.name} {time.time() - t0:6.1f}s] {msg}", flush=True)

    clock = _Clock(deadline, log)
    tok = ByteTokenizer()
    params = lmj.load(run / "model")
    cal = lmj.Calibration.load(run / "calibration.npz")
    L = int(cal.train_len)
    lengths = list(lengths or [m * L for m in MULTIPLES])
    runner = LMRunner(params, backend=backend)
    ev = run / "eval"

    def spec(name, cal_=cal, c=0.05, b=1.0):
        return MethodSpec(name, calibration=cal_ if base_name(name) == "longmamba" else None,
                          channel_threshold=c, scale=b, L_base=L)

    for m in methods:
        if clock.ok(f"passkey {m}"):
            r = run_passkey(runner, tok, spec(m), lengths=lengths, samples_per_depth=samples,
                            batch_size=batch_size, show_progress=False)
            r["settings"] = {"model": str(run / "model"), **r["settings"]}
            save_run(str(ev), r, quiet=quiet)
            log(f"passkey {m}: " + " ".join(f"{x}:{y:.0f}" for x, y in
                                            zip(lengths, r["curves"]["accuracy"]["y"],
                                                strict=True)))
    if diagnose_prompts and clock.ok("diagnose"):
        long = [x for x in lengths if x >= 8 * L] or [max(lengths)]  # where the key gets lost
        rows = needle_report(params, cal, lengths=long, n_prompts=diagnose_prompts,
                             backend=backend)
        (run / "needle_deltas.json").write_text(json.dumps(rows, indent=1))
        log(f"diagnose: {len(rows)} rows")
    if perplexity:
        for m in methods:
            if clock.ok(f"perplexity {m}"):
                r = run_perplexity(runner, tok, spec(m), lengths=lengths, windows=ppl_windows,
                                   text=ppl_text, batch_size=ppl_windows, show_progress=False)
                save_run(str(ev), r, quiet=quiet)
                log(f"perplexity {m}: " + " ".join(f"{y:.2f}" for y in
                                                   r["curves"]["perplexity"]["y"]))
    for lever in levers:
        if not clock.ok(f"lever {lever.name}"):
            continue
        lcal = cal
        if lever.clamp_top is not None:
            tc = TrainConfig(**json.loads((run / "train_config.json").read_text()))
            with open(tc.text, encoding="utf-8") as f:
                train_text, _ = split_text(f.read(), tc.val_frac)
            stream = TaskSampler(tc, train_text).calibration_stream(tc.calib_windows)
            lcal = lmj.calibrate(params, stream, train_len=L, num_windows=tc.calib_windows,
                                 clamp_top=lever.clamp_top, backend=backend, progress=False)
            (run / "levers" / lever.name).mkdir(parents=True, exist_ok=True)
            lcal.save(run / "levers" / lever.name / "calibration.npz")
        r = run_passkey(runner, tok, spec("longmamba", lcal, lever.channel_threshold,
                                          lever.scale),
                        lengths=[m * L for m in lever_multiples],
                        samples_per_depth=lever_samples, batch_size=batch_size,
                        show_progress=False)
        r["settings"] = {"model": str(run / "model"), "lever": dataclasses.asdict(lever),
                         "global_channels": int(sum(np.sum(g) for g in lcal.global_channels(
                             lever.channel_threshold))), **r["settings"]}
        save_run(str(run / "levers" / lever.name), r, quiet=quiet)
        log(f"lever {lever.name}: " + " ".join(f"{y:.0f}" for y in
                                               r["curves"]["accuracy"]["y"]))
    log("done")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longmamba_evals.short_train.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of longmamba_evals.short_train.train")
    p.add_argument("--samples", type=int, default=20, help="keys per (length, depth)")
    p.add_argument("--multiples", default=",".join(map(str, MULTIPLES)),
                   help="passkey / perplexity lengths as multiples of L_train")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--backend", default="associative")
    p.add_argument("--methods", default="vanilla,longmamba,decimamba")
    p.add_argument("--diagnose-prompts", type=int, default=10)
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--ppl-windows", type=int, default=10)
    p.add_argument("--ppl-text", default=None, help="held-out text (default: LAMBADA excerpt)")
    p.add_argument("--levers", default="",
                   help="';'-separated NAME:c=..,b=..,rho=.. LongMamba variants")
    p.add_argument("--lever-samples", type=int, default=10)
    p.add_argument("--lever-multiples", default="8,16,32")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which no new job starts")
    args = p.parse_args(argv)
    try:
        levers = [parse_lever(s) for s in args.levers.split(";") if s.strip()]
        multiples = [int(x) for x in args.multiples.split(",")]
        for run in args.runs:
            L = lmj.Calibration.load(Path(run) / "calibration.npz").train_len
            evaluate_run(run, samples=args.samples, lengths=[m * L for m in multiples],
                         batch_size=args.batch_size, backend=args.backend,
                         methods=tuple(args.methods.split(",")),
                         diagnose_prompts=args.diagnose_prompts,
                         perplexity=not args.no_perplexity, ppl_windows=args.ppl_windows,
                         ppl_text=args.ppl_text, levers=levers,
                         lever_samples=args.lever_samples,
                         lever_multiples=[int(x) for x in args.lever_multiples.split(",")],
                         deadline=args.deadline)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
