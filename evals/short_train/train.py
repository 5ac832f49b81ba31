"""Train small byte-level Mamba2 / Mamba-1 models at a short context (passkey retrieval and
LAMBADA text), export and calibrate them: the "train short, test long" models.

    python -m longmamba_evals.short_train.train --arch mamba2 --steps 940 \
        --seeds 0,1,2 --out runs/seed{seed} [--time-budget-s 275] [--data-workers 6]

Every `TrainConfig` field is a flag (`train_config.py`); the rows are built by `train_data.py`,
the model, loss and steps by `train_model.py`, the loop, checkpoints, export and calibration by
`train_loop.py`. Text: `evals/data/lambada_train.txt`, its last `val_frac` held out for
validation (LM loss, teacher-forced passkey accuracy). `--diagnose` writes the LongMamba
diagnostics of a finished run (`evaluate.needle_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import longmamba_jax as lmj
from longmamba_evals.short_train.evaluate import needle_report
from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_evals.short_train.train_loop import export_and_calibrate, recalibrate, train_seeds

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m longmamba_evals.short_train.train",
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
    p.add_argument("--calib-storage", choices=("auto", "exact", "grid"), default="auto",
                   help="storage of the LongMamba calibration (exact: what the 'alpha' and "
                        "'offline' selection rules need; auto: exact for small models)")
    p.add_argument("--recalibrate", action="store_true",
                   help="only calibrate the exported model of the run in OUT again (on the "
                        "windows of its first calibration), with --calib-storage")
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
        if args.recalibrate:
            recalibrate(args.out, backend=args.calib_backend, storage=args.calib_storage)
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
                                     backend=args.calib_backend, storage=args.calib_storage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
