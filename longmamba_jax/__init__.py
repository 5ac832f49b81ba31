"""longmamba-jax: Mamba and Mamba2 in JAX, loaded from PyTorch checkpoints, with training-free
context extension (LongMamba, DeciMamba).

    import longmamba_jax as lmj
    params = lmj.load("state-spaces/mamba2-130m")        # or a local directory
    logits = lmj.forward(params, tokens)                  # tokens int [batch, length]

    lm = lmj.LanguageModel.from_pretrained("state-spaces/mamba2-130m")   # text in, text out
    lm.generate("The capital of France is", max_new_tokens=20)

    state = lmj.training.init_train_state(params, optax.adamw(3e-4))   # fine-tuning
"""

from importlib import metadata as _metadata

from longmamba_jax import training
from longmamba_jax.backends import BACKENDS, resolve_backend
from longmamba_jax.calibration import Calibration, calibrate
from longmamba_jax.checkpoints import CheckpointError, export_torch, load
from longmamba_jax.config import ConfigError, Mamba2Config, MambaConfig
from longmamba_jax.demo import demo_model
from longmamba_jax.generation import (
    GenerateOutput,
    decode_step,
    generate,
    prefill,
    prefill_chunked,
    stream_generate,
)
from longmamba_jax.hybrid import BambaConfig, HybridCache, Zamba2Config
from longmamba_jax.lm import LanguageModel
from longmamba_jax.methods import DeciMamba, LongMamba
from longmamba_jax.model import Cache, Params, apply_model, empty_cache, forward, init_params
from longmamba_jax.quantization import quantize
from longmamba_jax.sharding import make_mesh, shard, shard_cache, shard_train_state
from longmamba_jax.sharding.context_parallel import (
    forward_context_parallel,
    prefill_context_parallel,
)

try:
    __version__ = _metadata.version("longmamba-jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "apply_model", "BACKENDS", "BambaConfig", "Cache", "calibrate", "Calibration",
    "CheckpointError", "ConfigError", "DeciMamba", "decode_step", "demo_model", "empty_cache",
    "export_torch", "forward", "forward_context_parallel", "generate", "GenerateOutput",
    "HybridCache", "init_params", "LanguageModel", "load", "LongMamba", "make_mesh",
    "Mamba2Config", "MambaConfig", "Params", "prefill", "prefill_chunked",
    "prefill_context_parallel", "quantize", "resolve_backend", "shard", "shard_cache",
    "shard_train_state", "stream_generate", "training", "Zamba2Config",
]
