"""Self-verification of a conversion: our forward against transformers' torch model.

The torch model is built from `to_hf_config` on the meta device and handed the converted
weights themselves (`load_state_dict(assign=True)` over zero-copy views of the JAX buffers, fp32
parameters; bf16 ones are upcast), so verifying costs activations, not a second copy of the
model. Both run the same random tokens on CPU; the logits are compared by relative norm
‖ours − torch‖ / ‖torch‖ against a per-dtype tolerance, and the max relative error
max|ours − torch| / max|torch| is reported beside it. NaN or inf never passes.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np

from longmamba_jax.config import Mamba2Config, MambaConfig

# Relative-norm tolerance per parameter dtype. The torch model runs in fp32 on the same values,
# so bf16 parameters (bf16 activations in our forward) are held to a bf16-sized tolerance.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}


class VerificationError(ValueError):
    """The converted model does not reproduce the torch model's logits."""


def torch_unavailable() -> str | None:
    """None when torch and transformers can be imported, else the reason."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or exc} is not installed"
    return None


def truncate(params, n_layer: int):
    """The first `n_layer` layers of `params` (for verifying very large models cheaply)."""
    from longmamba_jax.model import Params

    if n_layer >= params.config.n_layer:
        return params
    if not isinstance(params.config, (MambaConfig, Mamba2Config)):
        raise ValueError(f"--verify-layers: a {params.config.family} model is verified whole "
                         "(its layers are not one stack)")
    weights = dict(params.weights)
    weights["layers"] = jax.tree.map(lambda a: a[:n_layer], params.weights["layers"])
    return Params(weights, dataclasses.replace(params.config, n_layer=n_layer))


def _as_torch(array):
    import torch

    array = np.asarray(array)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    with warnings.catch_warnings():  # read-only JAX buffers: torch warns, we never write them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


# model_type -> (model class, config class) in transformers
TORCH_CLASSES = {
    "mamba": ("MambaForCausalLM", "MambaConfig"),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config"),
    "falcon_mamba": ("FalconMambaForCausalLM", "FalconMambaConfig"),
    "zamba2": ("Zamba2ForCausalLM", "Zamba2Config"),
    "bamba": ("BambaForCausalLM", "BambaConfig"),
}


def torch_model(params):
    """transformers' model of `params`' family (`TORCH_CLASSES`: fp32, eval) holding them."""
    import torch
    import transformers

    from longmamba_jax.checkpoints.export import iter_torch_tensors, to_hf_config

    hf = to_hf_config(params.config)
    hf.pop("architectures")
    cls, cfg_cls = (getattr(transformers, name) for name in TORCH_CLASSES[hf.pop("model_type")])
    with torch.device("meta"):
        model = cls(cfg_cls(**hf))
    state = {key: _as_torch(value) for key, value in iter_torch_tensors(params, "transformers")}
    # tied tensors (the head, Zamba2's later uses of a shared block) are left out of the export;
    # here they are pointed at what they are tied to
    expected = model.state_dict()
    for key in expected.keys() - state.keys():
        source = _tied_source(model, key)
        if source is not None and source in state:
            state[key] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model)
    return model.eval()


def _materialise_buffers(model) -> None:
    """Non-persistent buffers built on the meta device get values: rotary frequencies from a
    fresh rotary module, the rest (FalconMamba's unused norm weights) ones."""
    import torch

    for module in model.modules():
        metas = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        fresh = type(module)(model.config) if "Rotary" in type(module).__name__ else None
        for name in metas:
            value = getattr(fresh, name) if fresh is not None else \
                torch.ones(getattr(module, name).shape)
            module.register_buffer(name, value, persistent=False)


def _tied_source(model, key: str) -> str | None:
    """The key that `key` is tied to in `model` (transformers' `_tied_weights_keys`), if any."""
    if key == "lm_head.weight":
        for name in ("backbone.embeddings.weight", "model.embed_tokens.weight"):
            if name in model.state_dict():
                return name
    ties = getattr(getattr(model, "model", None), "_tied_weights_keys", None) or {}
    for target, source in ties.items():  # Zamba2: {layers.i.shared_transformer: layers.j...}
        prefix = f"model.{target}."
        if key.startswith(prefix):
            return f"model.{source}." + key[len(prefix):]
    return None


def verify(params, *, batch: int = 2, length: int = 17, seed: int = 0, check=None) -> dict:
    """Compares `longmamba_jax.forward(params, tokens)` with the transformers torch model.

    Args:
      params: `Params` (what was written, loaded back).
      batch, length: shape of the random token batch.
      seed: token seed.
      check: called between the steps (the converter's safe point for signals).

    Returns:
      {"rel_norm_err", "max_rel_err", "tolerance", "dtype", "tokens": [batch, length],
       "n_layer", "passed"}.
    """
    import torch
    import transformers

    from longmamba_jax.model import forward

    config = params.config
    dtype = str(np.dtype(params.dtype))
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length),
                                                  dtype=np.int64)
    check = check if check is not None else (lambda: None)
    ours = np.asarray(forward(params, tokens.astype(np.int32)), np.float32)
    check()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "falling back to the reference kernel" notices
    try:
        model = torch_model(params)
        check()
        with torch.no_grad():
            ref = model(torch.from_numpy(tokens), use_cache=False).logits.float().numpy()
        del model
    finally:
        transformers.logging.set_verbosity(verbosity)
    if ours.shape != ref.shape:
        raise VerificationError(f"logits shape {ours.shape} differs from the torch model's "
                                f"{ref.shape}")
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())
    diff = np.abs(ours.astype(np.float64) - ref)
    ref_norm = float(np.linalg.norm(ref.astype(np.float64)))
    rel_norm = float(np.linalg.norm(diff) / max(ref_norm, 1e-30)) if finite else float("nan")
    max_rel = float(diff.max() / max(float(np.abs(ref).max()), 1e-30)) if finite \
        else float("nan")
    tol = TOLERANCE.get(dtype, 2e-2)
    return {
        "rel_norm_err": rel_norm,
        "max_rel_err": max_rel,
        "tolerance": tol,
        "dtype": dtype,
        "tokens": [batch, length],
        "n_layer": config.n_layer,
        "passed": bool(finite and rel_norm <= tol),
    }
