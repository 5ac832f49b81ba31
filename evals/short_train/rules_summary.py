"""LongMamba's token-selection rules over the seeds of short-training runs: passkey accuracy vs
length (a line per rule), accuracy by depth at one length, perplexity.

Reads run directories, each holding train_config.json (its arch and seed) and the eval CLI's
result files anywhere below it (`passkey_{method}.json[.gz]`, `perplexity_{method}.json[.gz]`:
what `OUT=... EVAL=rules bash evals/device/train_and_eval.sh` writes under seed{S}/rules*/),
groups them by architecture and writes OUT/rules_summary.md and, per architecture,
OUT/rules_{arch}.png (accuracy vs length, mean over seeds; accuracy by depth at --depth-length).

    python -m longmamba_evals.short_train.rules_summary evals/results/h200/rules_seeds/* \\
        --out evals/results/h200/rules_seeds
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["load_rule_runs", "summarize", "main"]

# the order of the rows: the published default first, then the fixed-count rules
ORDER = ["vanilla", "longmamba", "longmamba-budget", "longmamba-alpha", "longmamba-offline",
         "longmamba-channelwise_topk", "longmamba-all_topk", "longmamba-bound", "longmamba-norm"]
LABEL = {"vanilla": "vanilla", "longmamba": "`threshold` (default)"}


def _label(method: str) -> str:
    return LABEL.get(method, f"`{method.removeprefix('longmamba-')}`")


def _read(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def load_rule_runs(dirs) -> dict[str, list[dict]]:
    """{arch: [{"seed", "dir", "passkey": {method: result}, "perplexity": {...}}, ...]}."""
    by_arch: dict[str, list[dict]] = defaultdict(list)
    for d in map(Path, dirs):
        cfg_path = d / "train_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{d} has no train_config.json (not a training run)")
        cfg = _read(cfg_path)
        run = {"dir": str(d), "seed": int(cfg["seed"]), "train_len": int(cfg["train_len"]),
               "passkey": {}, "perplexity": {}}
        for task in ("passkey", "perplexity"):
            for path in sorted(d.rglob(f"{task}_*.json*")):
                if path.name.endswith((".json", ".json.gz")):
                    r = _read(path)
                    run[task][r["method"]] = r
        by_arch[cfg["arch"]].append(run)
    for runs in by_arch.values():
        runs.sort(key=lambda r: r["seed"])
    return dict(by_arch)


def _methods(runs: list[dict], task: str) -> list[str]:
    found = {m for r in runs for m in r[task]}
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


def _by_depth(result: dict, length: int) -> dict[float, float] | None:
    hits: dict[float, list[bool]] = defaultdict(list)
    for s in result["samples"]:
        if s["length"] == length:
            hits[float(s["depth"])].append(bool(s["correct"]))
    return {d: 100.0 * float(np.mean(v)) for d, v in sorted(hits.items())} or None


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{np.mean(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def summarize(by_arch: dict[str, list[dict]], depth_length: int | None = None) -> dict:
    """Per arch: lengths, rows of (method, per-length accuracies over seeds), per-depth rows at
    `depth_length` (default: the second-longest length), perplexity rows."""
    out = {}
    for arch, runs in sorted(by_arch.items()):
        lengths = sorted({x for r in runs for res in r["passkey"].values()
                          for x in res["curves"]["accuracy"]["x"]})
        at = depth_length or (lengths[-2] if len(lengths) > 1 else lengths[-1])
        acc, depth, ppl = {}, {}, {}
        for m in _methods(runs, "passkey"):
            acc[m] = {x: [] for x in lengths}
            depth[m] = []  # one {depth: accuracy} per seed
            for r in runs:
                res = r["passkey"].get(m)
                if res is None:
                    continue
                c = res["curves"]["accuracy"]
                for x, y in zip(c["x"], c["y"], strict=True):
                    acc[m][x].append(float(y))
                d = _by_depth(res, at)
                if d is not None:
                    depth[m].append({"seed": r["seed"], "depths": d})
        for m in _methods(runs, "perplexity"):
            ppl[m] = defaultdict(list)
            for r in runs:
                res = r["perplexity"].get(m)
                if res is not None:
                    c = res["curves"]["perplexity"]
                    for x, y in zip(c["x"], c["y"], strict=True):
                        ppl[m][x].append(float(y))
        out[arch] = {"train_len": runs[0]["train_len"], "seeds": [r["seed"] for r in runs],
                     "lengths": lengths, "depth_length": at, "accuracy": acc,
                     "by_depth": depth, "perplexity": {m: dict(v) for m, v in ppl.items()}}
    return out


def _markdown(summary: dict) -> str:
    lines = []
    for arch, s in summary.items():
        L = s["train_len"]
        mult = [f"{x // L}×" if x % L == 0 else str(x) for x in s["lengths"]]
        lines += [f"## {arch}: passkey accuracy (%) vs length", "",
                  f"Mean over the seeds that ran the rule (min–max); L_train = {L}; seeds "
                  f"{', '.join(map(str, s['seeds']))}.", "",
                  "| rule | " + " | ".join(mult) + " | seeds |",
                  "|---|" + "---|" * (len(mult) + 1)]
        for m, per in s["accuracy"].items():
            n = max(len(v) for v in per.values())
            lines.append(f"| {_label(m)} | " + " | ".join(_cell(per[x]) for x in s["lengths"])
                         + f" | {n} |")
        at = s["depth_length"]
        depths = sorted({d for rows in s["by_depth"].values() for r in rows for d in r["depths"]})
        head = f"{at // L}×" if at % L == 0 else str(at)
        lines += ["", f"## {arch}: accuracy (%) by depth at {head} L_train ({at} tokens)", "",
                  "Mean over seeds; the last column is the worst (seed, depth) cell.", "",
                  "| rule | " + " | ".join(f"{d:g}" for d in depths) + " | worst |",
                  "|---|" + "---|" * (len(depths) + 1)]
        for m, rows in s["by_depth"].items():
            if not rows:
                continue
            cells = [np.mean([r["depths"][d] for r in rows if d in r["depths"]]) for d in depths]
            worst = min(min(r["depths"].values()) for r in rows)
            lines.append(f"| {_label(m)} | " + " | ".join(f"{c:.0f}" for c in cells)
                         + f" | {worst:.0f} |")
        if s["perplexity"]:
            xs = sorted({x for v in s["perplexity"].values() for x in v})
            lines += ["", f"## {arch}: perplexity per byte", "",
                      "Mean over the seeds that ran the rule (min–max).", "",
                      "| rule | " + " | ".join(f"{x // L}×" for x in xs) + " | seeds |",
                      "|---|" + "---|" * (len(xs) + 1)]
            for m, per in s["perplexity"].items():
                n = max(len(v) for v in per.values())
                cells = []
                for x in xs:
                    v = per.get(x, [])
                    cells.append("–" if not v else f"{np.mean(v):.2f}" if len(v) == 1 else
                                 f"{np.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})")
                lines.append(f"| {_label(m)} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _plot(arch: str, s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", "-.", ":"]
    markers = "os^vDPX*h"
    L = s["train_len"]
    for i, (m, per) in enumerate(s["accuracy"].items()):
        xs = [x for x in s["lengths"] if per[x]]
        a.plot([x / L for x in xs], [np.mean(per[x]) for x in xs], styles[i % 4],
               marker=markers[i % len(markers)], label=_label(m).replace("`", ""))
        rows = s["by_depth"].get(m) or []
        if rows:
            ds = sorted(rows[0]["depths"])
            b.plot(ds, [np.mean([r["depths"][d] for r in rows]) for d in ds], styles[i % 4],
                   marker=markers[i % len(markers)], label=_label(m).replace("`", ""))
    a.set_xscale("log", base=2)
    a.set_xlabel("prompt length / L_train")
    a.set_ylabel("passkey accuracy (%), mean over seeds")
    a.set_title(f"{arch}: accuracy vs length")
    b.set_xlabel("depth of the key in the prompt")
    b.set_title(f"{arch}: accuracy by depth at {s['depth_length'] // L}× L_train")
    for ax in (a, b):
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longmamba_evals.short_train.rules_summary",
                                description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (train_config.json + results)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--depth-length", type=int, default=None,
                   help="length of the by-depth table (default: the second-longest)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        runs = load_rule_runs([d for d in args.runs if os.path.isdir(d)])
        if not runs:
            raise FileNotFoundError("no run directories among the arguments")
        summary = summarize(runs, args.depth_length)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rules_summary.md"), "w", encoding="utf-8") as f:
        f.write("# LongMamba's token-selection rules over seeds\n\n" + _markdown(summary))
    if not args.no_plot:
        for arch, s in summary.items():
            _plot(arch, s, os.path.join(args.out, f"rules_{arch}.png"))
    print(_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
