"""What a task run writes, per (task, method), in the output directory:

    OUT/{task}_{method}.json   every sample (prompt length, expected, produced) + summary curves
    OUT/{task}_{method}.md     the markdown table
    OUT/{task}.md              one table of every method's curve found in OUT
    OUT/{task}.png             the curve(s) vs context length, one line per method found in OUT
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from longmamba_evals.tasks.lengths import short_length
from longmamba_evals.tasks.methods import METHODS, base_name

__all__ = ["load_runs", "markdown_table", "plot_runs", "save_run", "summary_markdown"]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with 2 decimals."""

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, columns)) + " |",
             "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_run(out_dir: str, result: dict, *, plot: bool = True, quiet: bool = False) -> dict:
    """Writes one run's JSON + markdown, and the task's combined markdown + PNG over all methods.

    Args:
        out_dir: the output directory (created if missing).
        result: a task result with keys task, method, metric, curves {name: {x: [...], y:
            [...]}}, table {columns, rows}, samples, settings.
        plot: write `{task}.png`.
        quiet: do not print the table.

    Returns:
        {"json": path, "markdown": path, "summary": path, "plot": path or None}.
    """
    os.makedirs(out_dir, exist_ok=True)
    task, method = result["task"], result["method"]
    base = os.path.join(out_dir, f"{task}_{method}")
    tmp = base + ".json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=_json_default, ensure_ascii=False)
    os.replace(tmp, base + ".json")
    title = f"# {task} · {method}\n\n"
    settings = result.get("settings", {})
    meta = "".join(f"- {k}: {v}\n" for k, v in settings.items()) + "\n"
    table = markdown_table(result["table"]["columns"], result["table"]["rows"])
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(title + meta + table)
    if not quiet:
        print(f"\n{task} · {method}\n{table}", flush=True)
    runs = load_runs(out_dir, task)
    summary = os.path.join(out_dir, f"{task}.md")
    with open(summary, "w", encoding="utf-8") as f:
        f.write(summary_markdown(task, runs))
    png = None
    if plot and any(c.get("x") for c in result["curves"].values()):
        png = os.path.join(out_dir, f"{task}.png")
        plot_runs(task, runs, png)
    return {"json": base + ".json", "markdown": base + ".md", "summary": summary, "plot": png}


def load_runs(out_dir: str, task: str) -> list[dict]:
    """Every `{task}_{method}.json` in `out_dir` (sorted by method order)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, f"{task}_*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                run = json.load(f)
            except json.JSONDecodeError:
                continue
        if run.get("task") == task and "curves" in run:
            runs.append(run)
    rank = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (rank.get(base_name(r["method"]), len(rank)), r["method"]))
    return runs


def summary_markdown(task: str, runs: Sequence[dict]) -> str:
    """One table per curve: rows = methods, columns = context lengths."""
    out = [f"# {task}: all methods\n"]
    if not runs:
        return out[0]
    if "scores" in runs[0]:
        names = list(dict.fromkeys(k for r in runs for k in r.get("scores", {})))
        rows = [[r["method"]] + [r.get("scores", {}).get(k, float("nan")) for k in names]
                for r in runs]
        out.append(f"\n## {runs[0].get('metric', '')}\n\n")
        out.append(markdown_table(["method"] + names, rows))
    for name in runs[0]["curves"]:
        xs = sorted({x for r in runs for x in r["curves"].get(name, {}).get("x", [])})
        rows = []
        for r in runs:
            c = r["curves"].get(name)
            if c is None:
                continue
            lookup = dict(zip(c["x"], c["y"], strict=True))
            rows.append([r["method"]] + [lookup.get(x, float("nan")) for x in xs])
        metric = runs[0].get("metric", "")
        title = metric if metric.startswith(name) else f"{name} ({metric})"
        out.append(f"\n## {title}\n\n")
        out.append(markdown_table(["method"] + [str(x) for x in xs], rows))
    return "".join(out)


def plot_runs(task: str, runs: Sequence[dict], path: str) -> None:
    """Plots each curve vs context length, one line per method, one panel per curve name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(runs[0]["curves"]) if runs else []
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    markers, styles = "osD^vPX*", ("-", "--", "-.", ":")
    for ax, name in zip(axes.ravel(), names, strict=False):
        for i, r in enumerate(runs):
            c = r["curves"].get(name)
            if c and c["x"]:
                # each method its own marker and line style, and a small shift along the (log)
                # x axis, so that a method whose curve equals another's stays visible
                shift = 1.0 + 0.025 * (i - (len(runs) - 1) / 2)
                ax.plot([x * shift for x in c["x"]], c["y"], marker=markers[i % len(markers)],
                        linestyle=styles[i % len(styles)], markersize=5, alpha=0.85,
                        label=r["method"])
        xs = sorted({x for r in runs for x in r["curves"].get(name, {}).get("x", [])})
        ax.set_xscale("log")
        ax.set_xticks(xs, [short_length(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if "accuracy" in runs[0].get("metric", ""):
            ax.set_ylim(-3, 103)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(runs[0].get("metric", ""))
        ax.set_title(name if len(names) > 1 else task)
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
