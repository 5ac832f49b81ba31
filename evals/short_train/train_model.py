"""The model side of a short run: mamba_ssm's initialisation, the loss, the optimizer and
learning-rate schedule, and the train / eval steps vmapped over seeds (the train step is
`longmamba_jax.training.make_train_step` with this loss).

Initialisation follows mamba_ssm (Δ bias from log-uniform [1e-3, 0.1], A in [1, 16] for Mamba2,
out_proj scaled by 1/√n_layer). Parameters fp32, compute in bf16 (the parameters cast), the scan
in fp32. Loss, each term averaged over its own positions, then weighted:

    loss = w_answer · CE(answer digits) + w_second · CE(digits of the key's second occurrence
           in the needle) + w_lm · CE(every token)

(the second-occurrence term is a short-range copy that bootstraps the long-range one). AdamW
with warmup + cosine decay, gradient clipping at 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

import longmamba_jax as lmj
from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_jax import training
from longmamba_jax.model import Params

__all__ = ["LOSS_TERMS", "decay_mask", "init_state", "loss_terms", "lr_at", "make_optimizer",
           "make_steps", "mamba_init", "set_lr", "stack_trees", "unstack_tree"]

f32 = jnp.float32


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, f32, -bound, bound)


def _inv_softplus_dt(key, shape, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """mamba_ssm's Δ bias: dt log-uniform in [dt_min, dt_max], bias = softplus⁻¹(dt)."""
    u = jax.random.uniform(key, shape, f32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)),
                     floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def mamba_init(config, seed: int) -> Params:
    """fp32 parameters initialised as mamba_ssm does (torch Linear/Conv1d defaults, Δ bias,
    A, D = 1, out_proj / √n_layer, embedding N(0, 0.02))."""
    base = lmj.init_params(config, seed=seed, dtype=f32)
    w = jax.tree.map(lambda a: a, base.weights)
    mixer = dict(w["layers"]["mixer"])
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    L = config.n_layer

    def linear(name, extra_scale=1.0):
        k = mixer[name]["kernel"]  # [L, in, out]
        mixer[name] = {**mixer[name],
                       "kernel": _uniform(next(keys), k.shape, 1 / math.sqrt(k.shape[1]))
                       * extra_scale}

    linear("in_proj")
    linear("out_proj", 1 / math.sqrt(L))
    conv = mixer["conv1d"]
    bound = 1 / math.sqrt(conv["kernel"].shape[1])  # depthwise: fan_in = d_conv
    mixer["conv1d"] = {"kernel": _uniform(next(keys), conv["kernel"].shape, bound),
                       "bias": _uniform(next(keys), conv["bias"].shape, bound)}
    mixer["D"] = jnp.ones_like(mixer["D"])
    if isinstance(config, lmj.Mamba2Config):
        h = config.nheads
        mixer["dt_bias"] = _inv_softplus_dt(next(keys), (L, h))
        mixer["A_log"] = jnp.log(jax.random.uniform(next(keys), (L, h), f32, 1.0, 16.0))
    else:
        linear("x_proj")
        r = config.dt_rank
        dtp = mixer["dt_proj"]
        mixer["dt_proj"] = {"kernel": _uniform(next(keys), dtp["kernel"].shape, r ** -0.5),
                            "bias": _inv_softplus_dt(next(keys), dtp["bias"].shape)}
    w["layers"] = {**w["layers"], "mixer": mixer}
    return Params(w, config)


def decay_mask(weights):
    """Weight decay on matmul / conv kernels and the embedding only."""
    def leaf(path, _):
        names = [getattr(p, "key", "") for p in path]
        return names[-1] == "kernel" or names[:1] == ["embedding"]
    return jax.tree_util.tree_map_with_path(leaf, weights)


LOSS_TERMS = ("answer", "second", "lm")


def _logits(weights, config, batch, tc: TrainConfig):
    return training.model_logits(weights, config, batch, backend=tc.scan_backend,
                                 compute_dtype=tc.compute_dtype)


def _mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def loss_terms(logits, batch, tc: TrainConfig, whole: dict | None = None):
    """(total loss, {"loss", term: value}); the masks are per position t (predicting t + 1).

    Each term is Σ ce·mask / count, count = the term's positions in the whole step's batch
    (`whole`, default: this batch), so the losses of micro-batches add up to the step's."""
    ce, _ = training.next_token_ce(logits, batch["tokens"])
    whole = batch if whole is None else whole
    counts = {k: jnp.maximum(jnp.sum(whole[k][:, :-1]), 1.0) for k in LOSS_TERMS}
    terms = {k: jnp.sum(ce * batch[k][:, :-1]) / counts[k] for k in LOSS_TERMS}
    loss = tc.w_answer * terms["answer"] + tc.w_second * terms["second"] + tc.w_lm * terms["lm"]
    return loss, {"loss": loss, **terms}


def make_optimizer(tc: TrainConfig):
    """AdamW whose learning rate is a hyperparameter of its state (`set_lr` before each step),
    so the schedule can be fixed late (after the time budget is measured)."""
    def adamw(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(tc.grad_clip),
            optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
            optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
            optax.scale(-learning_rate),
        )
    return optax.inject_hyperparams(adamw)(learning_rate=0.0)


def set_lr(state: training.TrainState, lr: float) -> training.TrainState:
    """`state` (one run or stacked runs) with the learning rate of its next step set to `lr`."""
    hyper = state.opt_state.hyperparams
    rate = jnp.full_like(hyper["learning_rate"], lr)
    return state.replace(opt_state=state.opt_state._replace(
        hyperparams={**hyper, "learning_rate": rate}))


def lr_at(tc: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def init_state(tc: TrainConfig, config, seed: int, optimizer) -> training.TrainState:
    """The state of seed `seed` before its first step (`mamba_init`, fp32)."""
    return training.init_train_state(mamba_init(config, seed), optimizer, seed=seed)


def _step_key(tc: TrainConfig) -> TrainConfig:
    """tc without the fields the compiled steps do not depend on (one compile for all seeds)."""
    return dataclasses.replace(tc, seed=0, steps=0, time_budget_s=None)


def make_steps(tc: TrainConfig, config):
    """(train_step, eval_step, optimizer), vmapped over a leading seed axis S:

        train_step(state: TrainState [S, ...], batch {k: [S, B, L]}) -> (state, metrics {k: [S]})
        eval_step(weights [S, ...], batch {k: [B, L]}) -> metrics {k: [S]}

    train_step is `longmamba_jax.training.make_train_step` with this run's loss, backend,
    compute dtype and micro-batches (it consumes its input state; `set_lr` first). Cached, so
    runs with equal settings in one process (a resume, the tests) compile once."""
    return _make_steps(_step_key(tc), config)


@functools.lru_cache(maxsize=8)
def _make_steps(tc: TrainConfig, config):
    optimizer = make_optimizer(tc)

    def loss_fn(logits, batch, *, whole=None, rng=None):
        del rng
        return loss_terms(logits, batch, tc, whole)

    train_step = training.make_train_step(
        config, optimizer, backend=tc.scan_backend, compute_dtype=tc.compute_dtype,
        loss_fn=loss_fn, micro_batches=tc.micro_batches, vmap_seeds=True)

    def eval_step(weights, batch):
        logits = _logits(weights, config, batch, tc)
        ce, hit = training.next_token_ce(logits, batch["tokens"])
        # exact match = the " " and all 5 digits right (positions P-1 .. P+4)
        ans = batch["answer"][:, :-1]
        span = jnp.maximum(ans, jnp.pad(ans[:, 1:], ((0, 0), (0, 1))))
        correct = jnp.all(jnp.where(span > 0, hit, True), axis=-1)
        return {"passkey_acc": jnp.mean(correct.astype(f32)),
                "answer_loss": _mean(ce, ans), "lm_loss": _mean(ce, batch["lm"][:, :-1])}

    return train_step, jax.jit(jax.vmap(eval_step, in_axes=(0, None))), optimizer


def stack_trees(trees):
    """Pytrees of equal structure stacked on a new leading (seed) axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def unstack_tree(tree, i: int):
    """Entry `i` of a pytree stacked by `stack_trees`."""
    return jax.tree.map(lambda a: a[i], tree)
