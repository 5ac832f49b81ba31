"""Prompts of any length (1M tokens and more) in fixed-size chunks, memory bounded by the chunk.

Both architectures are recurrences with a fixed-size state per layer, so a prompt
x[0:S] cut into chunks x[0:c], x[c:2c], … gives exactly the one-shot result when each chunk
starts from the state the previous one left:

    cache_0 = zeros;   (logits_k, cache_k) = prefill(x[k·c:(k+1)·c], cache_{k−1}, total_len=S)

Only one chunk's activations are alive at a time (the `Cache` carried between chunks is a few
hundred MB at most: n_layer × b × state), so peak memory is set by `chunk_size`, not by S.
LongMamba filters every chunk with θ for the *total* length S (`total_len`), as the
one-shot prefill of S tokens would. DeciMamba decimates a whole prompt at once and is rejected.

Compiled programs (the bucketing): one for the full chunks (shape [b, chunk_size], shared by
every prompt of that batch size) and, when S is not a multiple of chunk_size, the remainder:
- `remainder="single"` (default): one call of the remainder's own shape [b, S mod chunk_size]:
  fastest for one length, but every new remainder length compiles a new program;
- `remainder="binary"`: the remainder as a sum of powers of two, one call per set bit, largest
  first: at most log2(chunk_size) programs ever, shared by all prompt lengths (at most
  log2(chunk_size) extra small calls per prompt). Use it when many prompt lengths are served.
The remainder runs last, so the returned logits are those of the prompt's last token either way.
Padding the last chunk instead is not an option: pad tokens would enter the state.

Index sizes: positions never exceed one call's length (≤ chunk_size), so no int32 index grows
with S; the total length is a Python int (LongMamba thresholds are computed on the host).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from longmamba_jax.generation.generate import prefill
from longmamba_jax.model import Cache, Params, empty_cache

REMAINDER_MODES = ("single", "binary")


def chunk_plan(length: int, chunk_size: int, remainder: str = "single") -> list[int]:
    """The chunk lengths `prefill_chunked` uses for a prompt of `length` tokens, in order."""
    if remainder not in REMAINDER_MODES:
        raise ValueError(f"remainder must be one of {REMAINDER_MODES}, got {remainder!r}")
    full, rest = divmod(length, chunk_size)
    plan = [chunk_size] * full
    if rest and remainder == "single":
        plan.append(rest)
    elif rest:
        plan += [1 << k for k in range(rest.bit_length() - 1, -1, -1) if rest >> k & 1]
    return plan


def prefill_chunked(params: Params, tokens, *, chunk_size: int = 65536, method: Any = None,
                    backend: str = "auto", remainder: str = "single",
                    progress: bool = False) -> tuple[Any, Cache]:
    """Prefills a prompt of any length chunk by chunk, carrying the state between chunks.

    Equal (within fp32 rounding) to `prefill(params, tokens, method=method)` in one call, with
    peak memory set by `chunk_size` instead of the prompt length.

    Args:
      params: `Params` from `load` or `init_params`.
      tokens: int [b, S] (numpy or jax), S any length >= 1.
      chunk_size: tokens per call (the memory knob; 65,536 keeps a 1.3B model in bf16 well
        under 20 GB).
      method: None or `LongMamba(...)` (θ for the total length S in every chunk); DeciMamba
        raises (it needs the whole prompt at once).
      backend: scan backend name, as for `prefill`.
      remainder: "single" or "binary": how the last S mod chunk_size tokens are cut (see the
        module docstring: compiled programs vs calls).
      progress: show a progress bar over the chunks (tqdm).

    Returns:
      (logits fp32 [b, V] at the last position, `Cache` after the last token).
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params, got {type(params).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tokens = np.asarray(tokens)  # host copy: chunks are sliced here, not by per-offset programs
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be int [batch, length >= 1], got shape {tokens.shape}")
    batch, total = tokens.shape
    plan = chunk_plan(total, int(chunk_size), remainder)
    cache = empty_cache(params.config, batch)  # explicit: the first chunk shares the program
    logits = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True)
    start = 0
    for size in plan:
        logits, cache = prefill(params, tokens[:, start : start + size], cache=cache,
                                method=method, backend=backend, total_len=total)
        start += size
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    return logits, cache
