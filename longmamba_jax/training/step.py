"""The train step: `TrainState` (fp32 master weights, optimizer state, step, key) and
`make_train_step`, one jitted `(state, batch) -> (state, metrics)` on optax (docs/training.md).

Per step: weights cast to `compute_dtype` -> `apply_model` (with `remat`) -> logits, padded
vocabulary entries masked -> `loss_fn` -> gradients in fp32 (through the cast) -> optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from longmamba_jax.backends import resolve_backend
from longmamba_jax.config import Config
from longmamba_jax.model import Params, apply_model
from longmamba_jax.training.loss import causal_lm_loss, check_batch

__all__ = ["TrainState", "init_train_state", "make_train_step", "model_logits"]

f32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "opt_state", "step", "rng"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a training run carries from step to step (a pytree; checkpointed whole).

    params: `Params` in the master dtype (fp32). opt_state: the optax state of `params.weights`.
    step: int32 scalar, steps taken. rng: uint32 [2] base key; step t's loss gets
    `fold_in(rng, t)`, so the key stream does not depend on where a run was resumed.
    """

    params: Params
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


def init_train_state(params: Params, optimizer: optax.GradientTransformation, *, seed: int = 0,
                     master_dtype=f32) -> TrainState:
    """The state before the first step: `params` cast to `master_dtype` (fp32 master weights,
    whatever dtype they were loaded in) and the optimizer's initial state."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params, got {type(params).__name__}")
    from longmamba_jax.quantization import refuse_quantized

    refuse_quantized(params, "training")
    params = params.astype(master_dtype)
    return TrainState(params, optimizer.init(params.weights), jnp.zeros((), jnp.int32),
                      jax.random.PRNGKey(seed))


def model_logits(weights, config: Config, batch: dict, *, backend="auto", remat=None,
                 compute_dtype=None):
    """fp32 logits [b, l, padded V] of the model on `batch` ("tokens", optional
    "attention_mask" (left padding: padded positions never enter the state) and
    "segment_ids"), the weights cast to `compute_dtype` first; padded vocabulary entries are
    set to the lowest fp32 value, so a softmax gives them no mass."""
    check_batch(batch)
    params = Params(weights, config)
    if compute_dtype is not None:
        params = params.astype(compute_dtype)
    mask = batch.get("attention_mask")
    mask = None if mask is None else jnp.asarray(mask).astype(f32)
    out = apply_model(params, batch["tokens"], mask=mask,
                      segment_ids=batch.get("segment_ids"), backend=resolve_backend(backend),
                      remat=remat)
    logits = out.logits
    if config.padded_vocab_size > config.vocab_size:
        real = jnp.arange(config.padded_vocab_size) < config.vocab_size
        logits = jnp.where(real, logits, jnp.finfo(f32).min)
    return logits


def make_train_step(config_or_params, optimizer: optax.GradientTransformation, *,
                    backend: str = "auto", remat: str | Callable | None = None,
                    compute_dtype=None, loss_fn: Callable = causal_lm_loss,
                    micro_batches: int = 1, vmap_seeds: bool = False, donate: bool = True):
    """A jitted train step `(state, batch) -> (state, metrics)`.

    Args:
      config_or_params: the model's config, or `Params` (their config is taken).
      optimizer: an optax transformation of the weights (e.g. `optax.adamw(3e-4)`).
      backend: scan backend ("auto", "reference", "associative", "pallas",
        "pallas-interpret"); every one has gradients.
      remat: per-layer rematerialisation, as `apply_model` takes it: None, "layer" or a
        `jax.checkpoint_policies` policy.
      compute_dtype: dtype the master weights are cast to for the forward (e.g. "bfloat16");
        None computes in the master dtype. Gradients and the update stay in the master dtype.
      loss_fn: `loss_fn(logits, batch, *, whole, rng) -> (loss, metrics)`; default
        `causal_lm_loss`. `whole` is the step's whole batch (means are over it, so the losses and
        metrics of micro-batches add up to the step's); `rng` the step's key.
      micro_batches: split the batch's rows into this many micro-batches, run one after another
        (gradients summed): the memory of a smaller batch, the step of the whole one.
      vmap_seeds: the step maps over a leading axis of state and batch (several runs, e.g.
        seeds, trained together in one program; stack their states with `jax.tree.map(
        jnp.stack, ...)`).
      donate: donate the input state's buffers to the output (the caller's state is consumed).

    The batch is a dict of [b, l] arrays: "tokens", optional "attention_mask", "segment_ids"
    and whatever `loss_fn` reads ("loss_mask" for `causal_lm_loss`). Metrics: `loss_fn`'s, plus
    "grad_norm" (global norm of the gradients).
    """
    config = config_or_params.config if isinstance(config_or_params, Params) else config_or_params
    if not isinstance(config, Config):
        raise TypeError(f"config_or_params must be a model config or Params, got "
                        f"{type(config_or_params).__name__}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    resolve_backend(backend)  # an unknown or unavailable backend fails here, not at trace time

    def loss(weights, batch, whole, key):
        logits = model_logits(weights, config, batch, backend=backend, remat=remat,
                              compute_dtype=compute_dtype)
        return loss_fn(logits, batch, whole=whole, rng=key)

    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def grads(weights, batch, key):
        if micro_batches == 1:
            (_, metrics), g = value_and_grad(weights, batch, None, key)
            return metrics, g
        rows = batch["tokens"].shape[0]
        if rows % micro_batches:
            raise ValueError(f"micro_batches {micro_batches} does not divide the batch's "
                             f"{rows} rows")
        # [b, ...] -> [k, b/k, ...]: one micro-batch per scan step, gradients summed
        micro = jax.tree.map(lambda a: a.reshape(micro_batches, rows // micro_batches,
                                                 *a.shape[1:]), batch)

        def body(acc, mb):
            (_, metrics), g = value_and_grad(weights, mb, batch, key)
            return jax.tree.map(jnp.add, acc, (metrics, g)), None

        first = jax.tree.map(lambda a: a[0], micro)
        shapes = jax.eval_shape(lambda: value_and_grad(weights, first, batch, key))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))
        (metrics, g), _ = jax.lax.scan(body, zero, micro)
        return metrics, g

    def step(state: TrainState, batch: dict):
        if state.params.config != config:
            raise ValueError("the state's model config is not the one the step was made for")
        key = jax.random.fold_in(state.rng, state.step)
        weights = state.params.weights
        check_batch(batch)
        metrics, g = grads(weights, batch, key)
        updates, opt_state = optimizer.update(g, state.opt_state, weights)
        weights = optax.apply_updates(weights, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(g)}
        new = TrainState(Params(weights, config), opt_state, state.step + 1, state.rng)
        return new, metrics

    if vmap_seeds:
        step = jax.vmap(step)
    return jax.jit(step, donate_argnums=(0,) if donate else ())
