"""Checkpoints: reading torch checkpoints (mamba_ssm native and transformers layouts), the
converter's Orbax format, and writing torch checkpoints back.

`load(source)` is the one entry point for every kind: a local directory or a hub id holding a
torch checkpoint (safetensors, sharded safetensors, `pytorch_model.bin`), or the output of the
converter (`python -m convert`), recognised by its `longmamba_config.json`.
"""

from __future__ import annotations

from pathlib import Path

from longmamba_jax.checkpoints.converted import CONVERTED_CONFIG
from longmamba_jax.checkpoints.export import export_torch
from longmamba_jax.checkpoints.files import CheckpointError
from longmamba_jax.checkpoints.source import resolve_source
from longmamba_jax.checkpoints.torch_format import load_torch_checkpoint

__all__ = ["CheckpointError", "export_torch", "load", "load_torch_checkpoint", "resolve_source"]


def load(source, *, dtype=None, revision: str | None = None, progress: bool = False):
    """Loads a model as `Params` (weights + config).

    Args:
      source: local directory or hub id (e.g. "state-spaces/mamba2-130m"); the hub is reached
        through huggingface_hub, so its cache and HF_HUB_OFFLINE are respected.
      dtype: None keeps the stored dtype; jnp.float32 or jnp.bfloat16 casts.
      revision: hub revision (branch, tag or commit).
      progress: show a progress bar over tensors.

    Raises:
      FileNotFoundError: no such directory, or a hub id that is not cached while offline.
      CheckpointError / ConfigError: the checkpoint is malformed (the message names file & key).
    """
    directory = resolve_source(source, revision=revision)
    if (Path(directory) / CONVERTED_CONFIG).exists():
        from longmamba_jax.checkpoints.converted import load_converted

        return load_converted(directory, dtype=dtype)
    params, _ = load_torch_checkpoint(directory, dtype=dtype, progress=progress)
    return params
