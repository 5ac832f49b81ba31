"""Fine-tuning: the causal-LM loss, the train step on optax, token batches, Orbax checkpoints
and a plain loop (docs/training.md).

    import optax
    import longmamba_jax as lmj
    from longmamba_jax import training

    optimizer = optax.adamw(3e-4)
    state = training.init_train_state(params, optimizer)           # fp32 master weights
    step = training.make_train_step(params, optimizer, compute_dtype="bfloat16", remat="layer")
    data = training.TokenBatches(token_ids, batch_size=8, seq_len=2048)
    state, log = training.fit(step, state, data.batch, num_steps=1000, log_path="log.jsonl")
"""

from longmamba_jax.training.checkpoint import latest_step, restore_checkpoint, save_checkpoint
from longmamba_jax.training.data import TokenBatches
from longmamba_jax.training.loop import fit
from longmamba_jax.training.loss import (
    causal_lm_loss,
    check_batch,
    next_token_ce,
    prediction_weights,
)
from longmamba_jax.training.step import TrainState, init_train_state, make_train_step, model_logits

__all__ = [
    "causal_lm_loss", "check_batch", "fit", "init_train_state", "latest_step", "make_train_step",
    "model_logits", "next_token_ce", "prediction_weights", "restore_checkpoint",
    "save_checkpoint", "TokenBatches", "TrainState",
]
