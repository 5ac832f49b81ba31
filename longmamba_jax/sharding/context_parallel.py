"""Context-parallel prefill: one long prompt split along the sequence over the devices of a
mesh axis ("seq"), every layer's scan combined across devices (docs/sharding.md, "Context
parallelism").

Device k holds tokens [k·l/P, (k+1)·l/P) and runs the whole model on them under one
`shard_map`; in each layer the conv reads the previous piece's last K − 1 inputs and the scans
pass states between pieces (`kernels.py`), so every layer's output, the logits and the final
cache equal the one-device prefill's up to rounding. Longer prompts go in rounds of
`chunk_size` tokens per device, the cache carried between rounds as in `prefill_chunked`.
LongMamba's thresholds are those of the whole prompt (θ for its total length).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longmamba_jax.backends import resolve_backend
from longmamba_jax.config import Mamba2Config, MambaConfig
from longmamba_jax.model import Cache, Params, _check_tokens, apply_model, empty_cache
from longmamba_jax.model import method_kwargs as _method_kwargs
from longmamba_jax.sharding.kernels import context_parallel_region
from longmamba_jax.sharding.mesh import SEQ, TENSOR, axis_size, batch_spec, check_mesh

_apply = getattr(apply_model, "__wrapped__", apply_model)  # traced inside our own program


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "backend", "last_n"))
def _run(params: Params, tokens, filters, cache: Cache, *, mesh, axis: str, backend,
         last_n: int | None):
    """Logits [b, l or P·last_n, V] (sequence over `axis`) and the cache after the last token
    (replicated over `axis`) of tokens [b, l] split in P pieces."""
    b = batch_spec(mesh, tokens.shape[0])

    def piece(params, tokens, filters, cache):
        with context_parallel_region(axis):
            out = _apply(params, tokens, filters=filters, cache=cache, backend=backend,
                         last_n=last_n, return_cache=True)
        return out.logits, out.cache

    cache_spec = Cache(P(None, b), P(None, b))
    mapped = jax.shard_map(
        piece, mesh=mesh, in_specs=(P(), P(b, axis), P(), cache_spec),
        out_specs=(P(b, axis), cache_spec), check_vma=False)
    return mapped(params, tokens, filters, cache)


def _checks(params: Params, tokens, mesh, axis: str, method, total_len: int):
    """The mesh's context size P and `apply_model`'s method arguments, after every check."""
    if not isinstance(params.config, (MambaConfig, Mamba2Config)):
        raise ValueError(f"context-parallel prefill runs Mamba and Mamba2 models; "
                         f"{type(params.config).__name__} has attention layers")
    mesh = check_mesh(mesh)
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no context axis {axis!r} (axes {mesh.axis_names})")
    if axis_size(mesh, TENSOR) > 1:
        raise ValueError("context parallelism does not combine with tensor parallelism; use a "
                         f"mesh with {TENSOR}=1")
    batch_spec(mesh, tokens.shape[0])
    kwargs = _method_kwargs(method, params.config, int(total_len), params=params)
    if kwargs.get("decimation"):
        raise ValueError("DeciMamba decimates the whole prompt at once; it has no "
                         "context-parallel prefill")
    if kwargs.get("rule") is not None:
        raise ValueError(f"the LongMamba rule {kwargs['rule'].kind!r} reads the whole prompt's "
                         "Δ in every layer; context parallelism needs rule='threshold'")
    return axis_size(mesh, axis), kwargs


def _piece_check(params: Params, length: int, pieces: int):
    window = params.config.d_conv - 1
    if length % pieces or length // pieces < max(window, 1):
        raise ValueError(f"{length} tokens cannot be split in {pieces} context-parallel pieces "
                         f"of at least {max(window, 1)} tokens each (d_conv − 1) and of equal "
                         "length")


def _place(mesh, axis, tokens, cache):
    b = batch_spec(mesh, tokens.shape[0])
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(b, axis)))
    cache = jax.device_put(cache, NamedSharding(mesh, P(None, b)))
    return tokens, cache


def forward_context_parallel(params: Params, tokens, mesh, *, method: Any = None,
                             backend: str = "auto", context_axis: str = SEQ):
    """Logits of the model on a prompt split along the sequence over `context_axis`.

    Args:
      params: `Params` (replicated onto the mesh here when not placed).
      tokens: int [b, l]; l a multiple of the axis size P, each piece >= d_conv − 1 tokens.
      mesh: a mesh with `context_axis` (and optionally data / fsdp axes that split the batch;
        no tensor axis of size > 1).
      method: None or `LongMamba(...)` with rule="threshold" (θ for l).
      backend: scan backend name, as for `forward`.
      context_axis: the mesh axis the sequence is split over.

    Returns:
      fp32 logits [b, l, V], split over `context_axis` along l.
    """
    tokens = _check_tokens(params, tokens)
    pieces, kwargs = _checks(params, tokens, mesh, context_axis, method, tokens.shape[1])
    _piece_check(params, tokens.shape[1], pieces)
    tokens, cache = _place(mesh, context_axis, tokens, empty_cache(params.config,
                                                                   tokens.shape[0]))
    logits, _ = _run(params, tokens, kwargs.get("filters"), cache, mesh=mesh,
                     axis=context_axis, backend=resolve_backend(backend), last_n=None)
    return logits


def prefill_context_parallel(params: Params, tokens, mesh, *, method: Any = None,
                             backend: str = "auto", context_axis: str = SEQ,
                             cache: Cache | None = None, total_len: int | None = None,
                             chunk_size: int | None = None):
    """`prefill` of one long prompt split along the sequence over `context_axis`.

    The prompt goes in rounds of P·chunk_size tokens (chunk_size tokens per device; one round
    of l/P per device by default), the cache carried between rounds; tokens left over when l
    is not a multiple of P·chunk_size go in one smaller round of equal pieces, and the last
    l mod P tokens (if any) through the one-device `prefill`.

    Args:
      params, tokens [b, l], mesh, method, backend, context_axis: as in
        `forward_context_parallel` (l any length >= P·(d_conv − 1)).
      cache: the state to continue from (None: zeros).
      total_len: the whole prompt's length when this is a later chunk (LongMamba's θ).
      chunk_size: tokens per device per round (the memory knob); None for l // P.

    Returns:
      (logits fp32 [b, V] at the last token, the `Cache` after it, replicated over the axis).
    """
    from longmamba_jax.generation import prefill

    tokens = np.asarray(_check_tokens(params, tokens))
    batch, length = tokens.shape
    total = length if total_len is None else int(total_len)
    if total < length:
        raise ValueError(f"total_len {total} is shorter than the prompt ({length} tokens)")
    pieces, kwargs = _checks(params, tokens, mesh, context_axis, method, total)
    if chunk_size is None:
        chunk_size = length // pieces
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    plan = [pieces * int(chunk_size)] * (length // (pieces * chunk_size))
    rest = length - sum(plan)
    if rest >= pieces * max(params.config.d_conv - 1, 1):
        plan.append(rest - rest % pieces)
    for size in plan:
        _piece_check(params, size, pieces)
    cache = empty_cache(params.config, batch) if cache is None else cache
    backend_ = resolve_backend(backend)
    start, logits = 0, None
    for size in plan:
        part, cache = _place(mesh, context_axis, tokens[:, start:start + size], cache)
        out, cache = _run(params, part, kwargs.get("filters"), cache, mesh=mesh,
                          axis=context_axis, backend=backend_, last_n=1)
        logits = out[:, -1]
        start += size
    if start < length:  # fewer tokens than P pieces of d_conv − 1: on one program
        logits, cache = prefill(params, tokens[:, start:], cache=cache, method=method,
                                backend=backend, total_len=total)
    return logits, cache
