"""Perplexity vs context length (the PG19 protocol of LongMamba / DeciMamba).

For each context length L, `windows` windows of L tokens are taken evenly spread over the
tokenized text (window w starts at round(w · (N − L) / (windows − 1))). Each window is run
through the model whole; the loss counts only its last `eval_tokens` (100) tokens:

    nll(window) = − Σ_{t = L−E}^{L−1} log softmax(logits[t − 1])[token[t]]     (E = eval_tokens)
    ppl(L)      = exp( Σ_windows nll / (windows · E) )

The softmax runs over the model's real vocabulary (`config.vocab_size`); padded ids are not
part of it. DeciMamba keeps the last E + 1 tokens (`keep_last`), so the scored positions are
never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import Runner, as_runner, progress
from longmamba_evals.tasks.text import load_text

__all__ = ["log_softmax_nll", "run_perplexity", "window_starts"]

DEFAULT_LENGTHS = (2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 100_000)


def window_starts(n_tokens: int, length: int, windows: int) -> list[int]:
    """Start offsets of `windows` windows of `length` tokens spread evenly over `n_tokens`.

    Raises:
        ValueError: if the text is shorter than one window, or `windows` < 1.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if length > n_tokens:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {length}; "
                         "pass a longer --text")
    if windows == 1:
        return [0]
    return [int(round(w * (n_tokens - length) / (windows - 1))) for w in range(windows)]


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per-position negative log-likelihood in fp64.

    Args:
        logits: float [..., t, v_padded], predictions for `targets`.
        targets: int [..., t].
        vocab_size: the real vocabulary (logits beyond it are ignored).

    Returns:
        float64 [..., t].
    """
    x = np.asarray(logits, dtype=np.float64)[..., :vocab_size]
    targets = np.asarray(targets)
    if targets.max(initial=0) >= vocab_size or targets.min(initial=0) < 0:
        raise ValueError(f"a target id is outside the vocabulary (size {vocab_size})")
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def run_perplexity(runner: Runner, tokenizer, method: MethodSpec | None = None, *,
                   lengths: Sequence[int] = DEFAULT_LENGTHS, windows: int = 10,
                   eval_tokens: int = 100, text: str | None = None, batch_size: int = 1,
                   show_progress: bool = True) -> dict:
    """Perplexity on the last `eval_tokens` tokens of windows of each length, for one method.

    Args:
        runner: the model: `longmamba_jax.Params`, an `LMRunner` or any `Runner`.
        tokenizer: the model's tokenizer.
        method: the method (None: vanilla).
        lengths: window lengths in tokens (each > eval_tokens).
        windows: windows per length, evenly spread over the text.
        eval_tokens: scored tokens at the end of each window.
        text: path of a long UTF-8 text (default: the bundled LAMBADA excerpt).
        batch_size: windows per forward call.
        show_progress: show a progress bar.

    Returns:
        The result dict: perplexity per length, and each window's start, length and NLL.
    """
    runner = as_runner(runner, tokenizer)
    method = method or MethodSpec("vanilla")
    lengths = [int(x) for x in lengths]
    if eval_tokens < 1:
        raise ValueError(f"eval_tokens must be >= 1, got {eval_tokens}")
    for ln in lengths:
        if ln <= eval_tokens:
            raise ValueError(f"window length {ln} must exceed eval_tokens ({eval_tokens})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray(tokenizer.encode(load_text(text)), dtype=np.int64)
    plan = {ln: window_starts(len(ids), ln, windows) for ln in lengths}  # checks all up front
    method_obj = method.build(runner.n_layer, keep_last=eval_tokens + 1)
    bar = progress(total=windows * len(lengths), desc=f"perplexity/{method.name}",
                   enabled=show_progress)
    samples, ppl = [], []
    for ln in lengths:
        starts = plan[ln]
        nlls = []
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            batch = np.stack([ids[s:s + ln] for s in chunk])  # [b, ln]
            # logits at positions ln-E-1 .. ln-1; the last one predicts past the window.
            logits = runner.logits(batch, eval_tokens + 1, method_obj)[:, :-1]
            nll = log_softmax_nll(logits, batch[:, -eval_tokens:], runner.vocab_size)
            for s, row in zip(chunk, nll, strict=True):
                total = float(row.sum())
                nlls.append(total)
                samples.append({"length": ln, "start": s, "prompt_len": ln,
                                "eval_tokens": eval_tokens, "nll_sum": total,
                                "ppl": float(np.exp(total / eval_tokens))})
            bar.update(len(chunk))
        ppl.append(float(np.exp(np.sum(nlls) / (len(nlls) * eval_tokens))))
    bar.close()
    return {
        "task": "perplexity",
        "method": method.name,
        "metric": "perplexity",
        "settings": {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                     "text": text or "bundled lambada_excerpt.txt", "text_tokens": len(ids),
                     "lengths": lengths, "windows": windows, "eval_tokens": eval_tokens,
                     **method.settings()},
        "curves": {"perplexity": {"x": lengths, "y": ppl}},
        "table": {"columns": ["length", "perplexity", "windows"],
                  "rows": [[ln, p, windows] for ln, p in zip(lengths, ppl, strict=True)]},
        "samples": samples,
    }
