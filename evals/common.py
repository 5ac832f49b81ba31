"""Shared machinery of the evaluations: model runner, methods, filler text, prompts, outputs.

Every task (passkey, ruler, perplexity, longbench, latency) builds token prompts here, runs them
through a `Runner` (by default `LMRunner`, i.e. `generate` / `forward`) with one
method (`vanilla`, `longmamba`, `decimamba`), and saves, per (task, method):

    OUT/{task}_{method}.json   every sample (prompt length, expected, produced) + summary curves
    OUT/{task}_{method}.md     the markdown table
    OUT/{task}.md              one table of every method's curve found in OUT
    OUT/{task}.png             the curve(s) vs context length, one line per method found in OUT

Prompts are assembled at the token level from separately encoded pieces (instruction, filler
words, needles, question), so a prompt hits its target length exactly; filler text is cut only
at word boundaries, which is where needles go.

Lengths on the command line accept a `k`/`m` suffix with k = 1,000 (so `128k` is 128,000 tokens;
write `131072` for a power of two).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

# Prompt pieces live in the library (the bundled demo builds the same prompts); re-exported.
from longmamba_jax.prompts import Filler, assemble, nearest_boundary

__all__ = [
    "DATA_DIR",
    "DEFAULT_TEXT",
    "METHODS",
    "Filler",
    "LMRunner",
    "as_runner",
    "MethodSpec",
    "Runner",
    "assemble",
    "decode_generated",
    "load_text",
    "markdown_table",
    "nearest_boundary",
    "parse_lengths",
    "progress",
    "save_run",
]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "lambada_excerpt.txt")
METHODS = ("vanilla", "longmamba", "decimamba")


# ----------------------------------------------------------------------------------------------
# Command-line style values


def parse_lengths(spec: str | Sequence[int | str]) -> list[int]:
    """Parses context lengths: "1k,2k,4096" -> [1000, 2000, 4096] (k = 1,000, m = 1,000,000).

    Args:
        spec: a comma-separated string, or a sequence of ints / strings.

    Returns:
        The lengths in the given order.

    Raises:
        ValueError: on an empty spec, a malformed item or a length < 1.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, (int, np.integer)):
            value = int(item)
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(item))
            if m is None:
                raise ValueError(f"bad length {item!r}: use an integer or e.g. '4k', '1.5k', '1m'")
            scale = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
            value_f = float(m.group(1)) * scale
            if value_f != int(value_f):
                raise ValueError(f"bad length {item!r}: not a whole number of tokens")
            value = int(value_f)
        if value < 1:
            raise ValueError(f"bad length {item!r}: must be >= 1")
        out.append(value)
    if not out:
        raise ValueError(f"no lengths given in {spec!r}")
    return out


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True):
    """A tqdm progress bar on stderr (a plain iterator when `enabled` is False)."""
    if not enabled:
        return iterable if iterable is not None else _NullBar()
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                leave=False)


class _NullBar:
    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method by name plus its settings; `build()` makes the `longmamba_jax` method object.

    DeciMamba's `keep_last` (trailing tokens never dropped: the question, the scored labels) is
    task-specific, so tasks pass it to `build`.

    Attributes:
        name: "vanilla", "longmamba" or "decimamba".
        calibration: LongMamba calibration file (.npz) or a loaded `Calibration`.
        channel_threshold: LongMamba c_thr (global channels have tA_prod > c_thr).
        scale: LongMamba b (Δ kept when Δ > b·θ_S).
        min_len: LongMamba switch-on length (None: the library default, S > L_train).
        decimamba_layers: DeciMamba decimating layers (None: the middle layer).
        L_base: DeciMamba L_base.
        beta: DeciMamba β.
        min_seq_len: DeciMamba min_seq_len.
    """

    name: str = "vanilla"
    calibration: Any = None
    channel_threshold: float = 0.05
    scale: float = 1.0
    min_len: int | None = None
    decimamba_layers: tuple[int, ...] | None = None
    L_base: int = 2000
    beta: float = 0.5
    min_seq_len: int = 20

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.name == "longmamba" and self.calibration is None:
            raise ValueError("method 'longmamba' needs a calibration file (--calibration FILE)")

    def build(self, n_layer: int | None = None, keep_last: int = 1):
        """Returns the method object for `longmamba_jax.forward/generate` (None for vanilla).

        Args:
            n_layer: the model's layer count (used for the default DeciMamba layer).
            keep_last: DeciMamba's never-dropped trailing tokens.
        """
        if self.name == "vanilla":
            return None
        import longmamba_jax as lm

        if self.name == "longmamba":
            cal = self.calibration
            if isinstance(cal, (str, os.PathLike)):
                cal = _load_calibration(os.fspath(cal))
            return lm.LongMamba(cal, channel_threshold=self.channel_threshold, scale=self.scale,
                                min_len=self.min_len)
        layers = self.decimamba_layers
        if layers is None:
            if n_layer is None:
                raise ValueError("decimamba needs --decimamba-layers (or a model to pick one)")
            layers = (n_layer // 2,)
        return lm.DeciMamba(list(layers), self.L_base, beta=self.beta,
                            min_seq_len=self.min_seq_len, keep_last=max(1, int(keep_last)))

    def settings(self) -> dict:
        """The settings that matter for this method, JSON-ready."""
        if self.name == "longmamba":
            cal = self.calibration
            return {"calibration": os.fspath(cal) if isinstance(cal, (str, os.PathLike))
                    else type(cal).__name__, "channel_threshold": self.channel_threshold,
                    "scale": self.scale, "min_len": self.min_len}
        if self.name == "decimamba":
            return {"layers": None if self.decimamba_layers is None
                    else list(self.decimamba_layers), "L_base": self.L_base, "beta": self.beta,
                    "min_seq_len": self.min_seq_len}
        return {}


@lru_cache(maxsize=4)
def _load_calibration(path: str):
    import longmamba_jax as lm

    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")
    calibration_cls = getattr(lm, "Calibration", None)
    if calibration_cls is None:  # not re-exported at the top level (yet)
        from longmamba_jax.calibration.artifact import Calibration as calibration_cls
    return calibration_cls.load(path)


# ----------------------------------------------------------------------------------------------
# Running the model


class Runner(Protocol):
    """What a task needs from a model. `LMRunner` is the real one; tests may pass fakes."""

    n_layer: int | None
    vocab_size: int

    def generate(self, tokens: np.ndarray, max_new_tokens: int, method: Any) -> np.ndarray:
        """tokens int [b, l] -> greedy continuation int [b, max_new_tokens]."""

    def logits(self, tokens: np.ndarray, last_n: int, method: Any) -> np.ndarray:
        """tokens int [b, l] -> fp32 logits [b, last_n, vocab] at the last `last_n` positions."""


class LMRunner:
    """Runs a `longmamba_jax` model: greedy `generate` and `forward(..., last_n=)`."""

    def __init__(self, params, *, backend: str = "auto", eos_token_id: int | None = None):
        """Wraps loaded params.

        Args:
            params: from `longmamba_jax.load` or `init_params` (has `.config`).
            backend: the scan backend passed to the library ("auto", "reference", ...).
            eos_token_id: stop id for generation (None: generate the full length).
        """
        self.params = params
        self.backend = backend
        config = params.config
        self.n_layer = int(config.n_layer)
        self.vocab_size = int(config.vocab_size)
        # A tokenizer's EOS the model cannot emit (e.g. the byte tokenizer's 256 on a 256-id
        # model) never stops generation.
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            eos_token_id = None
        self.eos_token_id = eos_token_id

    def generate(self, tokens: np.ndarray, max_new_tokens: int, method: Any) -> np.ndarray:
        import jax.numpy as jnp

        import longmamba_jax as lm

        out = lm.generate(self.params, jnp.asarray(tokens, dtype=jnp.int32),
                          max_new_tokens=int(max_new_tokens), method=method,
                          eos_token_id=self.eos_token_id, backend=self.backend)
        return np.asarray(out)

    def logits(self, tokens: np.ndarray, last_n: int, method: Any) -> np.ndarray:
        import jax.numpy as jnp

        import longmamba_jax as lm

        out = lm.forward(self.params, jnp.asarray(tokens, dtype=jnp.int32), method=method,
                         backend=self.backend, last_n=int(last_n))
        return np.asarray(out, dtype=np.float32)


def as_runner(model, tokenizer=None) -> Runner:
    """`model` itself if it is a `Runner`, else `LMRunner(model)` for `longmamba_jax.Params`
    (generation stops at the tokenizer's EOS)."""
    if hasattr(model, "generate") and hasattr(model, "logits"):
        return model
    if not hasattr(model, "config"):
        raise ValueError(f"expected longmamba_jax Params or a Runner, got {type(model).__name__}")
    return LMRunner(model, eos_token_id=getattr(tokenizer, "eos_token_id", None))


def decode_generated(tokenizer, ids: Sequence[int], eos_token_id: int | None) -> str:
    """Decodes generated ids, stopping at the first EOS (ids after it are padding)."""
    ids = [int(i) for i in ids]
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return tokenizer.decode(ids)


def load_model(src: str, tokenizer, *, seed: int = 0):
    """Loads params: a checkpoint dir / hub id, or `tiny-random:mamba1|mamba2` for smoke tests.

    Args:
        src: what `longmamba_jax.load` accepts, or "tiny-random:ARCH" (a tiny random model with
            the tokenizer's vocabulary; only useful to check the eval mechanics).
        tokenizer: the tokenizer (its `vocab_size` sizes a tiny random model).
        seed: init seed for tiny random models.
    """
    import longmamba_jax as lm

    if src.startswith("tiny-random:"):
        arch = src.split(":", 1)[1]
        configs = {"mamba1": "MambaConfig", "mamba2": "Mamba2Config"}
        if arch not in configs:
            raise ValueError(f"bad model {src!r}: use tiny-random:mamba1 or tiny-random:mamba2")
        config = getattr(lm, configs[arch]).tiny(vocab_size=int(tokenizer.vocab_size))
        return lm.init_params(config, seed=seed)
    return lm.load(src)


# ----------------------------------------------------------------------------------------------
# Text and prompt assembly


def load_text(path: str | None = None) -> str:
    """Reads a UTF-8 text file (default: the bundled LAMBADA excerpt)."""
    path = path or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty")
    return text


def fit_count(build: Callable[[int], int], target: int, lo: int = 0, hi: int = 64) -> int:
    """Largest count c >= lo with build(c) <= target, for a non-decreasing `build` (token length).

    Raises:
        ValueError: if even `build(lo)` exceeds `target`.
    """
    if build(lo) > target:
        raise ValueError(f"target length {target} is too short for this prompt "
                         f"(the smallest prompt has {build(lo)} tokens)")
    while build(hi) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------------
# Outputs


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
    runs.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"]))
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


def _short(x: float) -> str:
    """4000 -> "4k", 1500 -> "1.5k", 500 -> "500"."""
    if x >= 1_000_000 and x % 100_000 == 0:
        return f"{x / 1_000_000:g}m"
    if x >= 1000 and x % 100 == 0:
        return f"{x / 1000:g}k"
    return f"{x:g}"


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
    for ax, name in zip(axes.ravel(), names, strict=False):
        for r in runs:
            c = r["curves"].get(name)
            if c and c["x"]:
                ax.plot(c["x"], c["y"], marker="o", label=r["method"])
        xs = sorted({x for r in runs for x in r["curves"].get(name, {}).get("x", [])})
        ax.set_xscale("log")
        ax.set_xticks(xs, [_short(x) for x in xs])
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


class PieceEncoder:
    """Encodes text pieces one by one, with a cache; a prompt is the concatenation of pieces.

    Encoding pieces separately keeps every piece's token span known and makes a prompt's length
    the sum of its pieces' lengths, which is what length fitting needs.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._cache[piece] = tuple(self.tokenizer.encode(piece))
        return ids

    def length(self, pieces: Iterable[str]) -> int:
        """Total tokens of `pieces`."""
        return sum(len(self(p)) for p in pieces)

    def join(self, pieces: Iterable[str]) -> np.ndarray:
        """The concatenated tokens of `pieces`, int [total]."""
        return np.fromiter((t for p in pieces for t in self(p)), dtype=np.int64)


def generate_all(runner: Runner, prompts: Sequence[np.ndarray], max_new_tokens: int,
                 method_obj: Any, *, batch_size: int = 1, bar=None) -> list[np.ndarray]:
    """Greedy continuations of `prompts`, batching prompts of equal length (order preserved).

    Args:
        runner: the model.
        prompts: token arrays (any lengths).
        max_new_tokens: tokens to generate per prompt.
        method_obj: the method object (None for vanilla).
        batch_size: the most prompts per generate call.
        bar: a progress bar to advance (optional).

    Returns:
        One int array [max_new_tokens] per prompt.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            res = runner.generate(np.stack([prompts[i] for i in chunk]), max_new_tokens,
                                  method_obj)
            for i, ids in zip(chunk, res, strict=True):
                out[i] = np.asarray(ids)
            if bar is not None:
                bar.update(len(chunk))
    return out  # type: ignore[return-value]
