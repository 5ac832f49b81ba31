"""Running a model for the tasks: the `Runner` protocol, `LMRunner` (greedy `generate` and
`forward(..., last_n=)` of `longmamba_jax`), batched generation, and the tasks' progress bars."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from longmamba_jax.progress import progress_bar

__all__ = ["LMRunner", "Runner", "as_runner", "decode_generated", "device_name", "generate_all",
           "load_model", "progress"]


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True):
    """A tqdm progress bar on stderr (a plain iterator or a no-op bar when not `enabled`)."""
    return progress_bar(iterable, enabled=enabled, total=total, desc=desc, file=sys.stderr,
                        dynamic_ncols=True, leave=False)


def device_name() -> str:
    """"platform:device kind" of JAX's first device (e.g. "gpu:NVIDIA H100 80GB HBM3")."""
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform}:{getattr(d, 'device_kind', '')}"
    except Exception:  # the device name is informative only; never fail a run on it
        return "unknown"


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
    """Loads params from any `--model` form (`longmamba_jax.model_spec`): a checkpoint dir or
    hub id, "demo", or "tiny-random:ARCH" (sized to the tokenizer's vocabulary).

    Args:
        src: the model spec.
        tokenizer: the tokenizer (its `vocab_size` sizes a tiny random model).
        seed: init seed for tiny random models.
    """
    from longmamba_jax.model_spec import parse_model_spec

    return parse_model_spec(src).load(vocab_size=int(tokenizer.vocab_size), seed=seed)


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
