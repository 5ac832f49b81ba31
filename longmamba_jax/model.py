"""The language model: embedding -> n_layer × (x + mixer(rmsnorm(x))) -> rmsnorm -> lm_head.

Layer parameters are stacked along a leading layer axis and the layers run under one
`lax.scan` (one compiled block, fast compiles for 48 layers). DeciMamba cuts that scan into
segments at its decimating layers, since those change the sequence length.

`Params` is the one pytree users hold: the weights plus the config (static), so
`forward(params, tokens)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_jax.backends import resolve_backend
from longmamba_jax.config import Config, Mamba2Config, MambaConfig
from longmamba_jax.layers import linear, matmul_dtype, rms_norm
from longmamba_jax.mixers import Block, ScanBackend, row_ends
from longmamba_jax.packing import document_lengths, resolve_segment_ids
from longmamba_jax.selection import SelectionRule
from longmamba_jax.sharding.mesh import mesh_scope, place_batch, resolve_mesh

f32 = jnp.float32
DEFAULT_BACKEND = ScanBackend()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weights"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Params:
    """Model weights (a nested dict of arrays) with their config.

    Layout (paths mirror the torch keys; `kernel` is a torch weight transposed):
      embedding/weight [V, d]; layers/norm/weight [L, d]; layers/mixer/... [L, ...];
      norm_f/weight [d]; lm_head/kernel [d, V] (absent when tied to the embedding).
    Quantized weights (`longmamba_jax.quantize`) hold int8 kernels with an fp32 "scale" beside
    each (and an int8 lm_head even when tied; the embedding itself stays as it was).
    """

    weights: dict
    config: Config

    @property
    def dtype(self):
        return self.weights["embedding"]["weight"].dtype

    def astype(self, dtype) -> Params:
        """The weights cast to `dtype`; the int8 kernels of quantized weights and their fp32
        scales (`longmamba_jax.quantize`) stay as they are."""
        from longmamba_jax.quantization import cast_floats

        return Params(cast_floats(self.weights, dtype), self.config)

    def __repr__(self) -> str:
        """A summary (the weights would print megabytes): architecture, size, dtype."""
        cfg = self.config
        leaves = jax.tree.leaves(self.weights)
        count = sum(int(getattr(a, "size", 0)) for a in leaves)
        size = next((f"{count / unit:.{d}f}{name}" for unit, name, d in
                     ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)) if count >= unit), str(count))
        dtypes = sorted({str(getattr(a, "dtype", "?")) for a in leaves})
        return (f"Params({getattr(cfg, 'arch', type(cfg).__name__)}, {cfg.n_layer} layers, "
                f"d_model={cfg.d_model}, {size} params, {'/'.join(dtypes) or 'no weights'})")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["conv", "ssm"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Cache:
    """Recurrent state of every layer (fp32): what decoding and chunked prefill carry.

    conv: [n_layer, b, d_conv − 1, conv_dim], the last inputs of each layer's conv window.
    ssm:  [n_layer, b, d_inner, d_state] (Mamba-1) or [n_layer, b, nheads, headdim, d_state].
    """

    conv: jax.Array
    ssm: jax.Array


def empty_cache(config: Config, batch: int) -> Cache:
    """Zero states for `batch` sequences (a hybrid model's `HybridCache` has an empty KV cache,
    grown as tokens arrive)."""
    if not isinstance(config, (MambaConfig, Mamba2Config)):
        from longmamba_jax.hybrid import empty_hybrid_cache

        return empty_hybrid_cache(config, batch)
    conv = jnp.zeros((config.n_layer, batch, config.d_conv - 1, config.conv_dim), f32)
    if isinstance(config, Mamba2Config):
        ssm_shape = (config.nheads, config.headdim, config.d_state)
    else:
        ssm_shape = (config.d_inner, config.d_state)
    return Cache(conv, jnp.zeros((config.n_layer, batch, *ssm_shape), f32))


class LayerFilters(NamedTuple):
    """Per-layer LongMamba filter arrays: is_global [n_layer, C] bool, threshold [n_layer, C]
    (θ_S for the fixed-threshold rule; the rule's calibrated parameter for the others, see
    `longmamba_jax.selection`)."""

    is_global: jax.Array
    threshold: jax.Array


class ModelOutput(NamedTuple):
    logits: jax.Array  # [b, l', V] fp32 (l' = l, or last_n, or the DeciMamba-kept length)
    cache: Cache | None  # the state after the last token
    positions: jax.Array | None  # [b, l'] original positions of the logits (DeciMamba)
    dt: jax.Array | None  # [n_ssm_layer, b, l, C] Δ per SSM layer (capture_dt)


def init_params(config: Config, seed: int = 0, dtype=f32) -> Params:
    """Random weights with the torch models' parameter shapes (for tests and training)."""
    if not isinstance(config, (MambaConfig, Mamba2Config)):
        from longmamba_jax.hybrid import init_hybrid

        return init_hybrid(config, seed, dtype)
    key = jax.random.PRNGKey(seed)
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    block = Block(config, ScanBackend("reference"), dtype)
    dummy = jnp.zeros((1, 1, config.d_model), dtype)
    layers = jax.vmap(lambda k: block.init(k, dummy)["params"])(
        jax.random.split(k_layers, config.n_layer)
    )
    vocab = config.padded_vocab_size
    weights = {
        "embedding": {"weight": (0.02 * jax.random.normal(k_emb, (vocab, config.d_model)))
                      .astype(dtype)},
        "layers": layers,
        "norm_f": {"weight": jnp.ones((config.d_model,), dtype)},
    }
    if not config.tie_embeddings:
        weights["lm_head"] = {
            "kernel": (0.02 * jax.random.normal(k_head, (config.d_model, vocab))).astype(dtype)
        }
    return Params(weights, config)


def lm_head(params: Params, h):
    """Final RMSNorm and the (tied or untied) head: h [b, l, d] fp32 -> fp32 logits [b, l, V].
    The logits are rounded to the parameter dtype first, as torch computes them in it (on a GPU
    in the matmul's epilogue, `matmul_dtype`, so that a gradient's two head matmuls run in that
    dtype too, not in fp32). A tied model's head is the embedding, unless quantizing gave it an
    int8 lm_head of its own."""
    cfg, w = params.config, params.weights
    h = rms_norm(h, w["norm_f"]["weight"], cfg.norm_eps)  # fp32 in, fp32 out
    head = w.get("lm_head")
    if head is None:  # tied
        table = w["embedding"]["weight"]
        logits = jnp.einsum("bld,vd->blv", h.astype(table.dtype), table,
                            preferred_element_type=matmul_dtype(table.dtype))
    else:  # [d, V], float or int8 with its per-column scale [V]
        logits = linear(h, head["kernel"], scale=head.get("scale"), dtype=params.dtype)
    return logits.astype(params.dtype).astype(f32)


def _segments(n_layer: int, decimating: tuple[int, ...]):
    """[0, n) cut into runs of ordinary layers and single decimating layers, in order."""
    out, start = [], 0
    for layer in decimating:
        if start < layer:
            out.append((start, layer, False))
        out.append((layer, layer + 1, True))
        start = layer + 1
    if start < n_layer:
        out.append((start, n_layer, False))
    return out


REMAT_OPTIONS = (None, "layer")


def _remat(fn, remat):
    """fn (a layer: (h, x) -> (h, aux)) under `jax.checkpoint` as `remat` asks (see
    `apply_model`)."""
    if remat is None:
        return fn
    if remat == "layer":
        return jax.checkpoint(fn, prevent_cse=False)
    if callable(remat):
        return jax.checkpoint(fn, policy=remat, prevent_cse=False)
    raise ValueError(f"remat must be None, 'layer' or a jax.checkpoint_policies policy, got "
                     f"{remat!r}")


def _slice(tree, start, stop):
    return jax.tree.map(lambda a: a[start:stop], tree)


@functools.partial(
    jax.jit,
    static_argnames=("backend", "decimation", "last_n", "return_cache", "capture_dt", "step",
                     "rule", "remat"),
)
def apply_model(
    params: Params,
    tokens,
    *,
    mask=None,
    filters: LayerFilters | None = None,
    cache: Cache | None = None,
    backend: ScanBackend = DEFAULT_BACKEND,
    decimation: tuple[tuple[int, int, int], ...] = (),
    last_n: int | None = None,
    return_cache: bool = False,
    capture_dt: bool = False,
    step: bool = False,
    rule: SelectionRule | None = None,
    segment_ids=None,
    remat: str | Callable | None = None,
) -> ModelOutput:
    """The whole model, every option explicit (the public `forward`, `prefill`, `decode_step`
    and `calibrate` are thin wrappers).

    Args:
      params: `Params`. tokens: int [b, l].
      mask: [b, l] 1 for real tokens, 0 for (left) padding, or None.
      filters: LongMamba per-layer filter arrays, or None.
      cache: state to start from (chunked prefill / decoding), or None for zeros.
      backend: resolved `ScanBackend` (static).
      decimation: DeciMamba plan, ((layer, keep, keep_last), ...) ascending layers (static).
      last_n: only compute logits for the last n positions (static).
      return_cache: return the state after the last token.
      capture_dt: return Δ of every layer (calibration; incompatible with decimation).
      step: single-token recurrent step (l must be 1; needs a cache).
      segment_ids: [b, l] int, packed documents (`longmamba_jax.packing`), or None.
      rule: the LongMamba token-selection rule that reads `filters.threshold` as its per-channel
        parameter (static); None is the fixed-threshold rule, applied inside the scan.
      remat: rematerialisation of each layer under differentiation (static): None keeps what
        XLA saves; "layer" saves only each layer's input and recomputes the layer in the
        backward pass; a `jax.checkpoint_policies` policy saves what it allows
        (docs/training.md, "Rematerialisation").
    """
    cfg = params.config
    if not isinstance(cfg, (MambaConfig, Mamba2Config)):  # Zamba2, Bamba: docs/families.md
        from longmamba_jax.hybrid import apply_hybrid

        return apply_hybrid(params, tokens, mask=mask, filters=filters, cache=cache,
                            backend=backend, decimation=decimation, last_n=last_n,
                            return_cache=return_cache, capture_dt=capture_dt, step=step,
                            rule=rule, segment_ids=segment_ids)
    w = params.weights
    dtype = params.dtype
    batch, length = tokens.shape
    block = Block(cfg, backend, dtype)
    h = jnp.take(w["embedding"]["weight"], tokens, axis=0).astype(f32)  # [b, l, d]
    if cache is None:
        cache = empty_cache(cfg, batch)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    plan = {layer: (keep, keep_last) for layer, keep, keep_last in decimation}
    new_conv, new_ssm, dts = [], [], []
    for start, stop, decimating in _segments(cfg.n_layer, tuple(plan)):
        xs = {
            "params": _slice(w["layers"], start, stop),
            "conv": cache.conv[start:stop],
            "ssm": cache.ssm[start:stop],
        }
        if filters is not None:
            xs["glob"] = filters.is_global[start:stop]
            xs["thr"] = filters.threshold[start:stop]

        def layer(h, x, decimate=None):
            dt_filter = (x["glob"], x["thr"]) if "glob" in x else None
            h, aux = block.apply(
                {"params": x["params"]}, h, conv_state=x["conv"], ssm_state=x["ssm"],
                mask=mask, dt_filter=dt_filter, dt_rule=rule, decimate=decimate,
                capture_dt=capture_dt, step=step, segment_ids=segment_ids,
            )
            return h, (aux.conv_state, aux.ssm_state, aux.dt, aux.kept)

        if decimating:
            x0 = jax.tree.map(lambda a: a[0], xs)
            decimating_layer = functools.partial(layer, decimate=plan[start])
            h, (conv, ssm, dt, kept) = _remat(decimating_layer, remat)(h, x0)
            positions = jnp.take_along_axis(positions, kept, axis=1)
            conv, ssm = conv[None], ssm[None]
            dt = None if dt is None else dt[None]
        else:
            h, (conv, ssm, dt, _) = jax.lax.scan(_remat(layer, remat), h, xs)
        new_conv.append(conv)
        new_ssm.append(ssm)
        if capture_dt:
            dts.append(dt)
    if last_n == 1 and mask is not None:  # each row's last real token (right padding)
        last = (row_ends(mask) - 1)[:, None]  # [b, 1]
        h = jnp.take_along_axis(h, last[..., None], axis=1)
        positions = jnp.take_along_axis(positions, last, axis=1)
    elif last_n is not None:
        h, positions = h[:, -last_n:], positions[:, -last_n:]
    logits = lm_head(params, h)
    out_cache = None
    if return_cache:
        out_cache = Cache(jnp.concatenate(new_conv), jnp.concatenate(new_ssm))
    return ModelOutput(
        logits=logits,
        cache=out_cache,
        positions=positions if decimation else None,
        dt=jnp.concatenate(dts) if capture_dt else None,
    )


def forward(params: Params, tokens, *, method: Any = None, backend: str = "auto",
            last_n: int | None = None, attention_mask=None, return_positions: bool = False,
            segment_ids=None, cu_seqlens=None, mesh=None):
    """Logits of the model on `tokens`.

    Args:
      params: `Params` from `load` or `init_params`.
      tokens: int [b, l]; ids outside [0, padded_vocab_size) raise ValueError (traced under
        a caller's `jit`: NaN logits, docs/reliability.md, "Token ids").
      method: None (vanilla), `LongMamba(...)` or `DeciMamba(...)`.
      backend: "auto" | "reference" | "associative" | "pallas" | "pallas-interpret".
      last_n: return logits for the last n positions only (saves memory on long prompts).
      attention_mask: [b, l] 1 for real tokens, 0 for padding, left or right (not with
        DeciMamba): each row's real tokens get the logits they get alone.
      return_positions: also return the original positions [b, l'] of the returned logits
        (differs from arange only under DeciMamba, which drops tokens).
      segment_ids: int [b, l], packed documents: where the id changes a new document starts
        from a zero state, as if it ran alone; LongMamba filters each document with θ for its
        own length. Or `cu_seqlens` [0, l_1, l_1 + l_2, ..., l] for one row
        (`longmamba_jax.packing`).
      mesh: a `jax.sharding.Mesh` to run on (default: the one the weights were placed on with
        `longmamba_jax.shard`, if any): the batch is split over its data axes, the kernels run
        per device (docs/sharding.md).

    Returns:
      fp32 logits [b, l', padded_vocab], where l' = l, or last_n, or the number of tokens
      DeciMamba kept; with return_positions, (logits, positions).
    """
    tokens = _check_tokens(params, tokens)
    segment_ids = resolve_segment_ids(tokens.shape, segment_ids, cu_seqlens)
    kwargs = method_kwargs(method, params.config, tokens.shape[1], segment_ids, params=params)
    if attention_mask is not None and "decimation" in kwargs:
        raise ValueError("attention_mask (padding) is not supported with DeciMamba")
    mask = _mask(attention_mask, tokens)
    mesh = resolve_mesh(params, mesh)
    with mesh_scope(mesh):
        tokens, mask, segment_ids = place_batch(mesh, tokens, mask, segment_ids)
        out = apply_model(params, tokens, mask=mask, last_n=last_n,
                          backend=resolve_backend(backend), segment_ids=segment_ids, **kwargs)
    if not return_positions:
        return out.logits
    positions = out.positions
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        positions = positions[:, -last_n:] if last_n is not None else positions
    return out.logits, positions


def method_kwargs(method, config: Config, seq_len: int, segment_ids=None, *,
                  params: Params | None = None) -> dict:
    """What a context-extension method (None: vanilla) contributes to `apply_model` at prompt
    length seq_len (for packed documents: at each document's own length); with `params`, a
    method that has `check_params` (LongMamba: its calibration must be of these weights)
    checks them first."""
    if method is None:
        return {}
    if params is not None and hasattr(method, "check_params"):
        method.check_params(params)
    if segment_ids is None:
        return method.model_kwargs(config, seq_len)
    return method.model_kwargs(config, seq_len, documents=document_lengths(segment_ids))


def _check_tokens(params: Params, tokens):
    """`tokens` as int32 [b, l] after `check_token_ids` (and a `Params` check)."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params (from load/init_params), got "
                        f"{type(params).__name__}")
    tokens = check_token_ids(tokens, params.config.padded_vocab_size, ndim=2, name="tokens")
    if tokens.shape[1] == 0:
        raise ValueError("tokens is empty (length 0)")
    return tokens


def check_token_ids(tokens, vocab: int, *, ndim: int, name: str):
    """Token ids as int32, checked before any cast (an id beyond int32 must not wrap).

    Concrete ids: integers of `ndim` dimensions, every id in [0, vocab), else ValueError.
    Traced ids (under a caller's `jit`) cannot be checked on the host: an id out of range is
    replaced by `vocab`, the row past the embedding table that `jnp.take` fills with NaN, so its
    logits are all NaN (and its sequence's state after it) instead of another token's; and
    under `jax.experimental.checkify.checkify` the same condition is a checkify error
    (docs/reliability.md, "Token ids").
    """
    shape_hint = {1: "int [batch]", 2: "int [batch, length]"}[ndim]
    if isinstance(tokens, jax.Array):
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name} must be {shape_hint}, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if isinstance(tokens, jax.core.Tracer):
            from jax.experimental import checkify

            bad = (tokens < 0) | (tokens >= vocab)  # in the ids' own dtype: nothing wrapped yet
            checkify.debug_check(~jnp.any(bad), f"{name}: token ids must be in [0, {vocab})")
            return jnp.where(bad, vocab, tokens).astype(jnp.int32)
        if tokens.size:
            _check_range(name, int(tokens.min()), int(tokens.max()), vocab)
        return tokens.astype(jnp.int32)
    array = np.asarray(tokens)
    if array.dtype.kind in "fO" and not isinstance(tokens, np.ndarray):
        # Python ints beyond int64 make numpy pick float64 or object: check them as ints.
        items = np.asarray(tokens, dtype=object)
        if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
               for t in items.reshape(-1)):
            if items.ndim == ndim and items.size:
                _check_range(name, int(min(items.reshape(-1))), int(max(items.reshape(-1))),
                             vocab)
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be {shape_hint}, got {array.dtype} {array.shape}")
    if array.size:
        _check_range(name, int(array.min()), int(array.max()), vocab)
    return jnp.asarray(array, jnp.int32)


def _check_range(name: str, low: int, high: int, vocab: int) -> None:
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}) for this model; got {name} ids in "
                         f"[{low}, {high}] (is the tokenizer the model's?)")


def _mask(attention_mask, tokens):
    if attention_mask is None:
        return None
    mask = jnp.asarray(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {mask.shape} does not match tokens shape {tokens.shape}"
        )
    return mask.astype(f32)
