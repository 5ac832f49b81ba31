"""Mean ± spread over seeds of short-training runs: passkey, perplexity, LongMamba diagnostics.

Reads run directories written by `train.py` + `evaluate.py`
(RUN/train_config.json, RUN/eval/passkey_*.json, RUN/eval/perplexity_*.json,
RUN/needle_deltas.json[.gz], RUN/levers/*/passkey_longmamba.json), groups them by architecture, and
writes OUT/summary.md, OUT/summary.json and OUT/passkey_seeds.png (accuracy vs length, the mean
over seeds with the min–max band, one panel per architecture; perplexity below).

    python -m longmamba_evals.short_train.aggregate evals/results/short_train/mamba2_seed* \\
        evals/results/short_train/mamba1_seed* --out evals/results/short_train/summary
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from longmamba_evals.tasks.methods import METHODS
from longmamba_evals.tasks.outputs import markdown_table

__all__ = ["load_seed_runs", "aggregate", "main"]

LABELS = {"vanilla": "vanilla", "longmamba": "LongMamba", "decimamba": "DeciMamba"}


def _read(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_seed_runs(dirs) -> dict[str, list[dict]]:
    """{arch: [run, ...]}: per run its seed, steps, train_len and the result dicts found."""
    by_arch: dict[str, list[dict]] = defaultdict(list)
    for d in map(Path, dirs):
        cfg_path = d / "train_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{d} has no train_config.json (not a training run)")
        cfg = _read(cfg_path)
        log = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] \
            if (d / "train_log.jsonl").exists() else []
        done = [r for r in log if r.get("event") == "done"]
        run = {"dir": str(d), "seed": int(cfg["seed"]), "arch": cfg["arch"],
               "train_len": int(cfg["train_len"]),
               "steps": done[-1]["total_steps"] if done else None,
               "passkey": {}, "perplexity": {}, "levers": {}, "needles": None}
        for task in ("passkey", "perplexity"):
            for path in (glob.glob(str(d / f"{task}_*.json"))  # older runs: no eval/
                         + glob.glob(str(d / "eval" / f"{task}_*.json"))):
                r = _read(Path(path))
                run[task][r["method"]] = r
        for path in glob.glob(str(d / "levers" / "*" / "passkey_longmamba.json")):
            run["levers"][Path(path).parent.name] = _read(Path(path))
        if (d / "needle_deltas.json").exists():
            run["needles"] = _read(d / "needle_deltas.json")
        elif (d / "needle_deltas.json.gz").exists():  # as committed (Mamba-1's are large)
            with gzip.open(d / "needle_deltas.json.gz", "rt", encoding="utf-8") as f:
                run["needles"] = json.load(f)
        by_arch[cfg["arch"]].append(run)
    for runs in by_arch.values():
        runs.sort(key=lambda r: r["seed"])
    return dict(by_arch)


def _curve(result: dict, name: str) -> dict[int, float]:
    c = result["curves"][name]
    return dict(zip(c["x"], c["y"], strict=True))


def _stats(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size), "values": v.tolist()}


def _cell(s: dict | None, fmt: str = "{:.0f}") -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return fmt.format(s["mean"])
    return (f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} "
            f"({fmt.format(s['min'])}–{fmt.format(s['max'])})")


def _over_seeds(runs, task: str, method: str, curve: str):
    """{length: stats over the seeds that have this result}."""
    per = [_curve(r[task][method], curve) for r in runs if method in r[task]]
    if not per:
        return {}
    lengths = sorted(set.intersection(*(set(p) for p in per)))
    return {x: _stats([p[x] for p in per]) for x in lengths}


def _needle_summary(runs, lengths) -> list[dict]:
    """Per seed and length: global channels, how many keep >= 90% / < 50% of the key's digits,
    the filler kept, and Δ key / filler of the channels that lose the key."""
    rows = []
    for r in runs:
        if not r["needles"]:
            continue
        for x in lengths:
            ch = [c for c in r["needles"] if c["length"] == x and "key_kept" in c]
            if not ch:
                continue
            lost = [c for c in ch if c["key_kept"] < 0.5]
            rows.append({
                "seed": r["seed"], "length": x, "global": len(ch),
                "key_kept_ge_90": sum(c["key_kept"] >= 0.9 for c in ch),
                "key_kept_lt_50": len(lost),
                "filler_kept_median": float(np.median([c["filler_kept"] for c in ch])),
                "ratio_kept_median": float(np.median([c["key_over_filler"] for c in ch
                                                      if c["key_kept"] >= 0.5] or [np.nan])),
                "ratio_lost_median": float(np.median([c["key_over_filler"] for c in lost]
                                                     or [np.nan])),
                "lost_channels": [(c["layer"], c["channel"], round(c["decay_fraction"], 3))
                                  for c in lost][:20],  # the count is key_kept_lt_50
            })
    return rows


def aggregate(by_arch: dict[str, list[dict]]) -> dict:
    """The summary as a dict (what summary.json holds)."""
    out = {}
    for arch, runs in by_arch.items():
        L = runs[0]["train_len"]
        pk = {m: _over_seeds(runs, "passkey", m, "accuracy") for m in METHODS}
        ppl = {m: _over_seeds(runs, "perplexity", m, "perplexity") for m in METHODS}
        goal = None
        needed = {k * L for k in (1, 2, 8, 16)}
        if needed <= set(pk["vanilla"]) and needed <= set(pk["longmamba"]):
            per_seed = []
            for r in runs:
                if "vanilla" in r["passkey"] and "longmamba" in r["passkey"]:
                    v, lm = (_curve(r["passkey"][m], "accuracy") for m in ("vanilla",
                                                                            "longmamba"))
                    per_seed.append({
                        "seed": r["seed"],
                        "gain_8_16": float(np.mean([lm[k * L] - v[k * L] for k in (8, 16)])),
                        "gain_1_2": float(min(lm[k * L] - v[k * L] for k in (1, 2)))})
            goal = {"gain_8_16": _stats([p["gain_8_16"] for p in per_seed]),
                    "worst_gain_1_2": _stats([p["gain_1_2"] for p in per_seed]),
                    "per_seed": per_seed}
        levers = {}
        for name in sorted({n for r in runs for n in r["levers"]}):
            per = [_curve(r["levers"][name], "accuracy") for r in runs if name in r["levers"]]
            xs = sorted(set.intersection(*(set(p) for p in per)))
            first = next(r["levers"][name] for r in runs if name in r["levers"])
            levers[name] = {"settings": first["settings"].get("lever"),
                            "accuracy": {x: _stats([p[x] for p in per]) for x in xs}}
        out[arch] = {"train_len": L, "seeds": [r["seed"] for r in runs],
                     "steps": sorted({r["steps"] for r in runs if r["steps"] is not None}),
                     "passkey": pk, "perplexity": ppl, "goal": goal, "levers": levers,
                     "needles": _needle_summary(runs, [k * L for k in (8, 16, 32)]),
                     "per_seed_passkey": {r["seed"]: {m: _curve(r["passkey"][m], "accuracy")
                                                      for m in r["passkey"]} for r in runs}}
    return out


def _channels(lost, most: int = 6) -> str:
    out = " ".join(f"L{a}c{b}({d})" for a, b, d in lost[:most]) or "–"
    return out + (" …" if len(lost) > most else "")


def _lever_name(name: str, settings: dict | None) -> str:
    if not settings:
        return name
    rho = settings.get("clamp_top")
    return (f"{name}: c_thr {settings['channel_threshold']:g}, b {settings['scale']:g}, "
            f"ρ {'0.1 (the run' + chr(39) + 's)' if rho is None else f'{rho:g} (recalibrated)'}")


def _mult(x: int, L: int) -> str:
    return f"{x} ({x / L:g}×)"


def summary_markdown(summary: dict) -> str:
    parts = ["# Train short, test long: mean ± sd (min–max) over seeds\n"]
    for arch, s in summary.items():
        L = s["train_len"]
        parts.append(f"\n## {arch}: seeds {s['seeds']}, {s['steps']} steps, L_train {L}\n")
        learned = [seed for seed, v in s["per_seed_passkey"].items()
                   if v.get("vanilla", {}).get(L, 0) >= 90]
        parts.append(f"\nSeeds that learned the task (vanilla ≥ 90% at 1×): {learned}.\n")
        for task, metric, fmt in (("passkey", "accuracy (%)", "{:.0f}"),
                                  ("perplexity", "perplexity (last 100 tokens)", "{:.2f}")):
            xs = sorted({x for m in METHODS for x in s[task][m]})
            if not xs:
                continue
            rows = [[LABELS[m]] + [_cell(s[task][m].get(x), fmt) for x in xs]
                    for m in METHODS if s[task][m]]
            parts.append(f"\n### {task}: {metric}\n\n")
            parts.append(markdown_table(["method"] + [_mult(x, L) for x in xs], rows))
        g = s["goal"]
        if g:
            parts.append(
                f"\nLongMamba − vanilla, mean over 8× and 16×: {_cell(g['gain_8_16'])} points "
                f"(goal ≥ 30); worst of 1×, 2×: {_cell(g['worst_gain_1_2'])} (goal ≥ 0). "
                "Per seed: " + ", ".join(f"seed {p['seed']} {p['gain_8_16']:+.0f} / "
                                        f"{p['gain_1_2']:+.0f}" for p in g["per_seed"]) + ".\n")
        if s["per_seed_passkey"]:
            xs = sorted({x for v in s["per_seed_passkey"].values() for c in v.values()
                         for x in c})
            rows = [[f"seed {seed}", LABELS[m]] + [f"{c.get(x, float('nan')):.0f}" for x in xs]
                    for seed, v in s["per_seed_passkey"].items()
                    for m in METHODS if (c := v.get(m))]
            parts.append("\n### passkey per seed (%)\n\n")
            parts.append(markdown_table(["seed", "method"] + [_mult(x, L) for x in xs], rows))
        if s["needles"]:
            rows = [[n["seed"], _mult(n["length"], L), n["global"], n["key_kept_ge_90"],
                     n["key_kept_lt_50"], f"{100 * n['filler_kept_median']:.1f}%",
                     f"{n['ratio_kept_median']:.1f}", f"{n['ratio_lost_median']:.1f}",
                     _channels(n["lost_channels"])]
                    for n in s["needles"]]
            parts.append("\n### LongMamba diagnostics: global channels and the key\n\n"
                         "Per global channel, the key's digits (both occurrences) are kept when "
                         "Δ > θ_S. Columns: channels keeping ≥ 90% / < 50% of the key's digits, "
                         "the median fraction of filler kept, median Δ(key)/median Δ(filler) "
                         "of the channels that keep / lose the key, and the channels that lose "
                         "it (layer, channel, decay fraction tA).\n\n")
            parts.append(markdown_table(
                ["seed", "length", "global", "keep key ≥90%", "lose key (<50%)",
                 "filler kept", "Δ ratio (kept)", "Δ ratio (lost)", "channels losing the key"],
                rows))
        if s["levers"]:
            xs = sorted({x for lv in s["levers"].values() for x in lv["accuracy"]})
            rows = [["default (c 0.05, b 1)"]
                    + [_cell(s["passkey"]["longmamba"].get(x)) for x in xs]]
            rows += [[_lever_name(name, lv["settings"])] + [_cell(lv["accuracy"].get(x))
                                                            for x in xs]
                     for name, lv in s["levers"].items()]
            parts.append("\n### LongMamba levers: passkey accuracy (%)\n\n")
            parts.append(markdown_table(["LongMamba"] + [_mult(x, L) for x in xs], rows))
    return "".join(parts)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(summary)
    has_ppl = any(s["perplexity"]["vanilla"] for s in summary.values())
    nrows = 2 if has_ppl else 1
    fig, axes = plt.subplots(nrows, len(archs), figsize=(5.5 * len(archs), 3.8 * nrows),
                             squeeze=False)
    for j, arch in enumerate(archs):
        s = summary[arch]
        L = s["train_len"]
        for i, (task, ylabel) in enumerate((("passkey", "passkey accuracy (%)"),
                                            ("perplexity", "perplexity"))[:nrows]):
            ax = axes[i, j]
            for m in METHODS:
                c = s[task][m]
                if not c:
                    continue
                xs = sorted(c)
                mean = [c[x]["mean"] for x in xs]
                line, = ax.plot([x / L for x in xs], mean, marker="o", label=LABELS[m],
                                linestyle="--" if m == "decimamba" else "-")  # often = vanilla
                ax.fill_between([x / L for x in xs], [c[x]["min"] for x in xs],
                                [c[x]["max"] for x in xs], color=line.get_color(), alpha=0.15)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"context length / L_train (L_train = {L})")
            ax.set_ylabel(ylabel)
            if task == "passkey":
                ax.set_ylim(-3, 103)
            ax.set_title(f"{arch}: {task}, {len(s['seeds'])} seeds (mean, min–max)")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longmamba_evals.short_train.aggregate",
                                description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (one per seed and architecture)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        summary = aggregate(load_seed_runs(args.runs))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    md = summary_markdown(summary)
    Path(args.out, "summary.md").write_text(md, encoding="utf-8")
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plot(summary, os.path.join(args.out, "passkey_seeds.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
