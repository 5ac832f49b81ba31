"""Where a checkpoint comes from: a local directory, or a hub id fetched through
huggingface_hub (its cache, `HF_HUB_OFFLINE` and token respected)."""

from __future__ import annotations

import os
from pathlib import Path

from longmamba_jax.checkpoints.files import CheckpointError

HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "*.json"]


def resolve_source(source, *, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub (cache and
    HF_HUB_OFFLINE respected). Raises FileNotFoundError with what to do when offline."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: is a file; pass the checkpoint directory")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such directory (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), revision=revision,
                                      allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached "
            "(offline: HF_HUB_OFFLINE is set or there is no network). Download it elsewhere, "
            "or pass a local directory holding config.json and the weights."
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise FileNotFoundError(f"{source}: cannot fetch from the hub: {exc}") from None
