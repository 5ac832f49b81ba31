"""The recurrent decode step with its layers unrolled (opt-in:
`generate(..., decode_impl="unrolled")`).

The default step (`apply_model(..., step=True)`) runs the n_layer blocks under one `lax.scan`
over the stacked weights [n_layer, ...]. Inside the decode `while_loop` that is a loop in a loop:
every layer trip dynamic-slices its weights out of the stacked arrays, and XLA:GPU checks the
inner loop's condition on the host at every trip. At batch 1 a step is bound by those launches
and syncs, not by the bytes it must read (all weights once, ~2.7 GB for a 1.3B model in bf16,
~0.9 ms at 3 TB/s on an H100).

Here the stacked weights are split into n_layer per-layer pytrees once, before the decode loop
(`split_layers`: one copy of the layer weights per `generate` call, kept for the whole loop),
and the step is a straight line of n_layer blocks (`step_unrolled`): no inner loop, no dynamic
slices, static per-layer cache slices. Same blocks, same math, same order as the scan step:

    h = embed(token);  for i < n_layer: h, (conv_i, ssm_i) = block_i(h, conv_i, ssm_i)
    logits = lm_head(rmsnorm(h))

Cost: a bigger program (n_layer copies of the block: longer compile) and the weights held twice
while the loop runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.mixers import Block, ScanBackend
from longmamba_jax.model import Cache, LayerFilters, Params, lm_head

f32 = jnp.float32

DECODE_IMPLS = ("scan", "unrolled")


def split_layers(params: Params) -> tuple[dict, ...]:
    """The stacked layer weights as a tuple of n_layer per-layer pytrees (static slices)."""
    layers = params.weights["layers"]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(params.config.n_layer))


def step_unrolled(params: Params, layers: tuple[dict, ...], cache: Cache, token,
                  filters: LayerFilters | None, backend: ScanBackend):
    """One recurrent step, layers unrolled: token int32 [b] -> (logits fp32 [b, V], new cache).

    Args:
      params: `Params` (embedding, final norm, head and the config are read from it).
      layers: `split_layers(params)`, computed once outside the decode loop.
      cache: `Cache` (conv [n_layer, b, K−1, conv_dim], ssm [n_layer, b, ...]).
      token: int32 [b].
      filters: LongMamba per-layer filter arrays (filter_decode), or None.
      backend: resolved `ScanBackend` (the step is a plain recurrence on every backend).
    """
    cfg = params.config
    w = params.weights
    block = Block(cfg, backend, params.dtype)
    h = jnp.take(w["embedding"]["weight"], token[:, None], axis=0).astype(f32)  # [b, 1, d]
    convs, ssms = [], []
    for i, layer in enumerate(layers):
        dt_filter = None if filters is None else (filters.is_global[i], filters.threshold[i])
        h, aux = block.apply({"params": layer}, h, conv_state=cache.conv[i],
                             ssm_state=cache.ssm[i], dt_filter=dt_filter, step=True)
        convs.append(aux.conv_state)
        ssms.append(aux.ssm_state)
    return lm_head(params, h)[:, 0], Cache(jnp.stack(convs), jnp.stack(ssms))
