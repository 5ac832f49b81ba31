"""Saving and restoring a `TrainState` with Orbax (one directory per step under `directory`,
the newest `keep` kept). Restoring into a state of the same structure gives back exactly the
saved arrays, so a resumed run continues as the uninterrupted one would."""

from __future__ import annotations

import os

import jax

from longmamba_jax.model import Params
from longmamba_jax.training.step import TrainState

__all__ = ["latest_step", "restore_checkpoint", "save_checkpoint"]


def _manager(directory, keep: int | None = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory), item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))


def _tree(state: TrainState) -> dict:
    # the optimizer state as its list of leaves: optax's NamedTuples and empty states need no
    # support from Orbax, and the structure comes back from the state restored into
    return {"params": state.params.weights, "opt_state": jax.tree.leaves(state.opt_state),
            "step": state.step, "rng": state.rng}


def save_checkpoint(directory, state: TrainState, *, keep: int | None = 2) -> int:
    """Writes `state` as checkpoint number `state.step` under `directory` (created); keeps
    the newest `keep` (None: all). Returns the step."""
    import orbax.checkpoint as ocp

    step = int(state.step)
    with _manager(directory, keep) as mgr:
        mgr.save(step, args=ocp.args.StandardSave(_tree(state)), force=True)
        mgr.wait_until_finished()
    return step


def latest_step(directory) -> int | None:
    """The newest checkpoint's step under `directory`, or None (no directory, no checkpoint)."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mgr:
        return mgr.latest_step()


def restore_checkpoint(directory, like: TrainState, *, step: int | None = None
                       ) -> TrainState | None:
    """The state saved under `directory` (at `step`, default the newest), in the structure,
    dtypes and shardings of `like` (e.g. a fresh `init_train_state`); None when there is no
    checkpoint.

    Raises:
      ValueError: the checkpoint does not fit `like` (another model or optimizer).
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(like))
        _check_fits(mgr.item_metadata(step), abstract, f"checkpoint {step} in {directory}")
        tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), tree["opt_state"])
    return TrainState(Params(tree["params"], like.params.config), opt_state, tree["step"],
                      tree["rng"])


def _check_fits(metadata, abstract, what: str) -> None:
    """Raises ValueError naming the first entry whose presence or shape differs."""
    saved = dict(jax.tree_util.tree_flatten_with_path(getattr(metadata, "tree", metadata))[0])
    wanted = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    for path in sorted(set(saved) | set(wanted), key=str):
        name = jax.tree_util.keystr(path)
        if path not in saved or path not in wanted:
            where = "the state" if path not in wanted else "the checkpoint"
            raise ValueError(f"{what} does not fit this state (another model or optimizer?): "
                             f"{name} is missing from {where}")
        have, want = tuple(saved[path].shape), tuple(wanted[path].shape)
        if have != want:
            raise ValueError(f"{what} does not fit this state (another model or optimizer?): "
                             f"{name} has shape {have}, the state {want}")
