"""The model side of a short run: mamba_ssm's initialisation, the loss, the optimizer and
learning-rate schedule, and the jitted train / eval steps vmapped over seeds.

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
from longmamba_jax.model import Params, apply_model

__all__ = ["LOSS_TERMS", "decay_mask", "loss_terms", "lr_at", "make_optimizer", "make_steps",
           "mamba_init", "stack_trees", "unstack_tree"]

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


def _forward(weights, config, batch, tc: TrainConfig):
    params = Params(jax.tree.map(lambda a: a.astype(tc.compute_dtype), weights), config)
    logits = apply_model(params, batch["tokens"], mask=batch["mask"],
                         backend=lmj.resolve_backend(tc.scan_backend)).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, L-1, V] fp32
    labels = batch["tokens"][:, 1:]
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, L-1]
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    return ce, pred == labels


def _mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


LOSS_TERMS = ("answer", "second", "lm")


def loss_terms(weights, config, batch, tc: TrainConfig, counts: dict | None = None):
    """(total loss, {term: value}); masks are per position t (predicting t + 1).

    Each term is Σ ce·mask / count, count = the term's positions in the whole step's batch
    (`counts`, default: this batch's), so the losses of micro-batches add up to the step's."""
    ce, _ = _forward(weights, config, batch, tc)
    m = {k: batch[k][:, :-1] for k in LOSS_TERMS}
    if counts is None:
        counts = {k: jnp.maximum(jnp.sum(m[k]), 1.0) for k in m}
    terms = {k: jnp.sum(ce * m[k]) / counts[k] for k in m}
    loss = tc.w_answer * terms["answer"] + tc.w_second * terms["second"] + tc.w_lm * terms["lm"]
    return loss, terms


def make_optimizer(tc: TrainConfig):
    """AdamW without its learning rate (applied per step, so the schedule can be fixed late)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
    )


def lr_at(tc: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _step_key(tc: TrainConfig) -> TrainConfig:
    """tc without the fields the compiled steps do not depend on (one compile for all seeds)."""
    return dataclasses.replace(tc, seed=0, steps=0, time_budget_s=None)


def make_steps(tc: TrainConfig, config):
    """(train_step, eval_step, optimizer), jitted and vmapped over a leading seed axis S:

        train_step(weights [S, ...], opt_state [S, ...], batch {k: [S, B, L]}, lr)
            -> (weights, opt_state, metrics {k: [S]})
        eval_step(weights [S, ...], batch {k: [B, L]}) -> metrics {k: [S]}

    Cached, so runs with equal settings in one process (a resume, the tests) compile once."""
    return _make_steps(_step_key(tc), config)


@functools.lru_cache(maxsize=8)
def _make_steps(tc: TrainConfig, config):
    optimizer = make_optimizer(tc)
    k = tc.micro_batches

    def grads(weights, batch):
        vg = jax.value_and_grad(loss_terms, has_aux=True)
        if k == 1:
            (loss, terms), g = vg(weights, config, batch, tc)
            return loss, terms, g
        counts = {n: jnp.maximum(jnp.sum(batch[n][:, :-1]), 1.0) for n in LOSS_TERMS}
        # [B, L] -> [k, B/k, L]: one micro-batch per scan step, gradients summed
        micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)

        def body(acc, mb):
            (loss, terms), g = vg(weights, config, mb, tc, counts)
            return jax.tree.map(jnp.add, acc, (loss, terms, g)), None

        zero = (jnp.zeros((), f32), {n: jnp.zeros((), f32) for n in LOSS_TERMS},
                jax.tree.map(jnp.zeros_like, weights))
        (loss, terms, g), _ = jax.lax.scan(body, zero, micro)
        return loss, terms, g

    def train_step(weights, opt_state, batch, lr):
        loss, terms, g = grads(weights, batch)
        updates, opt_state = optimizer.update(g, opt_state, weights)
        weights = jax.tree.map(lambda w, u: w - lr * u, weights, updates)
        return weights, opt_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(g)}

    def eval_step(weights, batch):
        ce, hit = _forward(weights, config, batch, tc)
        # exact match = the " " and all 5 digits right (positions P-1 .. P+4)
        ans = batch["answer"][:, :-1]
        span = jnp.maximum(ans, jnp.pad(ans[:, 1:], ((0, 0), (0, 1))))
        correct = jnp.all(jnp.where(span > 0, hit, True), axis=-1)
        return {"passkey_acc": jnp.mean(correct.astype(f32)),
                "answer_loss": _mean(ce, ans), "lm_loss": _mean(ce, batch["lm"][:, :-1])}

    return (jax.jit(jax.vmap(train_step, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1)),
            jax.jit(jax.vmap(eval_step, in_axes=(0, None))), optimizer)


def stack_trees(trees):
    """Pytrees of equal structure stacked on a new leading (seed) axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def unstack_tree(tree, i: int):
    """Entry `i` of a pytree stacked by `stack_trees`."""
    return jax.tree.map(lambda a: a[i], tree)
