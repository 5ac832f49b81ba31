"""Prefill latency of each method against vanilla.

At each length, a batch of `batch_size` prompts of real text (the bundled excerpt, cycled when
shorter) runs through `forward(..., last_n=1)`: `warmup` untimed calls (compilation), then
`repeats` timed calls, each waited for (the logits are copied to the host). Reported: the median
time in ms, and each method's overhead over vanilla at the same length,

    overhead % = 100 · (median_method / median_vanilla − 1).

Vanilla is always measured (it is the baseline). Numbers depend on the device: the paper's
"< 4% overhead" claim is about GPUs, so only runs on a GPU count; the device is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import Runner, as_runner, device_name, progress
from longmamba_evals.tasks.text import load_text

__all__ = ["run_latency", "time_prefill"]

DEFAULT_LENGTHS = (8_000, 16_000, 32_000, 64_000)


def time_prefill(runner: Runner, tokens: np.ndarray, method_obj, *, warmup: int = 1,
                 repeats: int = 5) -> list[float]:
    """Wall times in seconds of `repeats` prefills of `tokens` [b, l] (after `warmup` calls)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        np.asarray(runner.logits(tokens, 1, method_obj))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(runner.logits(tokens, 1, method_obj))
        times.append(time.perf_counter() - t0)
    return times


def run_latency(runner: Runner, tokenizer, methods: Sequence[MethodSpec], *,
                lengths: Sequence[int] = DEFAULT_LENGTHS, batch_size: int = 1,
                warmup: int = 1, repeats: int = 5, text: str | None = None,
                show_progress: bool = True) -> list[dict]:
    """Times prefill for vanilla and each of `methods` at each length.

    Args:
        runner: the model: `longmamba_jax.Params`, an `LMRunner` or any `Runner`.
        tokenizer: encodes the text the prompts are cut from.
        methods: methods to compare (vanilla is added when missing).
        lengths: prompt lengths in tokens.
        batch_size: prompts per call.
        warmup: untimed calls per (method, length).
        repeats: timed calls per (method, length).
        text: text file for the prompts (default: the bundled excerpt).
        show_progress: show a progress bar.

    Returns:
        One result dict per method (vanilla first), each with median ms and overhead % per
        length, and every timed call.
    """
    runner = as_runner(runner, tokenizer)
    specs = [m for m in methods if m.name != "vanilla"]
    specs = [MethodSpec("vanilla")] + specs
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [int(x) for x in lengths]
    ids = np.asarray(tokenizer.encode(load_text(text)), dtype=np.int64)
    device = device_name()
    medians: dict[str, list[float]] = {m.name: [] for m in specs}
    samples: dict[str, list[dict]] = {m.name: [] for m in specs}
    bar = progress(total=len(lengths) * len(specs), desc="latency", enabled=show_progress)
    for ln in lengths:
        rows = [ids[(np.arange(ln) + b * 7919) % len(ids)] for b in range(batch_size)]
        tokens = np.stack(rows)  # [b, ln]
        for m in specs:
            method_obj = m.build(runner.n_layer, keep_last=1)
            times = time_prefill(runner, tokens, method_obj, warmup=warmup, repeats=repeats)
            medians[m.name].append(1000.0 * float(np.median(times)))
            samples[m.name].append({"length": ln, "prompt_len": ln, "batch_size": batch_size,
                                    "times_ms": [1000.0 * t for t in times]})
            bar.update(1)
    bar.close()
    base = medians["vanilla"]
    results = []
    for m in specs:
        overhead = [100.0 * (t / b - 1.0) for t, b in zip(medians[m.name], base, strict=True)]
        for s, o in zip(samples[m.name], overhead, strict=True):
            s["overhead_pct"] = o
        results.append({
            "task": "latency",
            "method": m.name,
            "metric": "ms / overhead %",
            "settings": {"device": device, "lengths": lengths, "batch_size": batch_size,
                         "warmup": warmup, "repeats": repeats, **m.settings()},
            "curves": {"prefill ms": {"x": lengths, "y": medians[m.name]},
                       "overhead vs vanilla (%)": {"x": lengths, "y": overhead}},
            "table": {"columns": ["length", "median ms", "overhead %"],
                      "rows": [[ln, t, o] for ln, t, o in zip(lengths, medians[m.name],
                                                                overhead, strict=True)]},
            "samples": samples[m.name],
        })
    return results
