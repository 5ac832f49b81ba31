"""Passkey retrieval: a random 5-digit key hidden at a given depth in filler text.

Prompt (DeciMamba / landmark-attention style), assembled from token pieces so that its length
is exactly the target:

    INSTRUCTION + filler[:a] + " The pass key is NNNNN. Remember it. NNNNN is the pass key."
                + filler[a:] + " What is the pass key? The pass key is"

with n = target − len(instruction) − len(needle) − len(question) filler tokens and the needle at
the word boundary nearest a = depth·n (depth 0: right after the instruction; depth 1: right
before the question). The answer is the first run of digits in the greedy continuation, cut to
5 digits; a sample is correct when it equals the key (exact match).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import Runner, as_runner, decode_generated, generate_all, progress
from longmamba_evals.tasks.text import Filler, load_text
from longmamba_jax.prompts import (  # the format lives in the library (the demo shares it)
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    PasskeyPrompt,
    parse_answer,
)
from longmamba_jax.prompts import make_passkey_prompt as make_prompt

__all__ = ["INSTRUCTION", "NEEDLE", "QUESTION", "PasskeyPrompt", "make_prompt", "parse_answer",
           "run_passkey"]

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTHS = (1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000)


def run_passkey(runner: Runner, tokenizer, method: MethodSpec | None = None, *,
                lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEPTHS,
                samples_per_depth: int = 1, text: str | None = None, seed: int = 0,
                max_new_tokens: int | None = None, batch_size: int = 1,
                show_progress: bool = True) -> dict:
    """Runs passkey retrieval for one method over lengths × depths × samples.

    Args:
        runner: the model: `longmamba_jax.Params`, an `LMRunner` or any `Runner`.
        tokenizer: the model's tokenizer.
        method: the method (None: vanilla).
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        samples_per_depth: keys per (length, depth).
        text: filler text (default: the bundled LAMBADA excerpt).
        seed: seeds the keys and filler offsets (the same for every method).
        max_new_tokens: tokens to generate (default: enough for 5 digits, 8 or 12 for BPE).
        batch_size: prompts per generate call (prompts of one length share a batch).
        show_progress: show a progress bar.

    Returns:
        The result dict (see `outputs.save_run`): accuracy per length and per (length, depth),
        and every sample.
    """
    runner = as_runner(runner, tokenizer)
    method = method or MethodSpec("vanilla")
    if samples_per_depth < 1:
        raise ValueError(f"samples_per_depth must be >= 1, got {samples_per_depth}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths, depths = [int(x) for x in lengths], [float(d) for d in depths]
    filler = Filler.from_text(tokenizer, load_text(text))
    if max_new_tokens is None:
        # Five digits plus a leading space: byte tokenizers need 6+, BPE far fewer.
        max_new_tokens = 8 if len(tokenizer.encode(" 12345")) >= 6 else 12
    eos = getattr(tokenizer, "eos_token_id", None)
    rng = np.random.default_rng(seed)
    plan = []  # (length, depth, key, start_unit), drawn up front: identical for every method
    for length in lengths:
        for depth in depths:
            for _ in range(samples_per_depth):
                plan.append((length, depth, str(int(rng.integers(10_000, 100_000))),
                             int(rng.integers(0, filler.n_units))))
    method_obj = method.build(runner.n_layer, keep_last=len(tokenizer.encode(QUESTION)))
    samples = []
    bar = progress(total=len(plan), desc=f"passkey/{method.name}", enabled=show_progress)
    for length in lengths:
        group = [p for p in plan if p[0] == length]
        prompts = [make_prompt(tokenizer, filler, ln, d, k, s) for ln, d, k, s in group]
        outs = generate_all(runner, [p.tokens for p in prompts], max_new_tokens, method_obj,
                            batch_size=batch_size, bar=bar)
        for p, ids in zip(prompts, outs, strict=True):
            text_out = decode_generated(tokenizer, ids, eos)
            answer = parse_answer(text_out)
            samples.append({
                "length": length, "depth": p.depth, "prompt_len": int(len(p.tokens)),
                "needle_pos": p.needle_pos, "actual_depth": round(p.actual_depth, 4),
                "expected": p.key, "produced": answer, "output": text_out,
                "correct": answer == p.key,
            })
    bar.close()
    return _summarize(samples, lengths, depths, method, tokenizer, seed, max_new_tokens)


def _summarize(samples, lengths, depths, method, tokenizer, seed, max_new_tokens) -> dict:
    def acc(rows):
        return 100.0 * float(np.mean([r["correct"] for r in rows])) if rows else float("nan")

    per_length = [acc([s for s in samples if s["length"] == ln]) for ln in lengths]
    rows = []
    for ln, a in zip(lengths, per_length, strict=True):
        cells = [acc([s for s in samples if s["length"] == ln and s["depth"] == d])
                 for d in depths]
        rows.append([ln] + cells + [a])
    return {
        "task": "passkey",
        "method": method.name,
        "metric": "accuracy (%)",
        "settings": {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                     "lengths": lengths, "depths": depths, "seed": seed,
                     "max_new_tokens": max_new_tokens, **method.settings()},
        "curves": {"accuracy": {"x": lengths, "y": per_length}},
        "table": {"columns": ["length"] + [f"depth {d:g}" for d in depths] + ["mean"],
                  "rows": rows},
        "samples": samples,
    }
