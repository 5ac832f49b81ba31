"""JAX -> PyTorch: configs and state dicts for transformers and mamba_ssm, and `export_torch`.
(FalconMamba, Zamba2 and Bamba: the transformers layout only.)

The inverse of the key table in `torch_format.py`: every parameter path maps back to its
torch key, `kernel` [in, out] back to a Linear weight [out, in], and the conv kernel [K, C] back
to a depthwise Conv1d weight [C, 1, K]. Layer-stacked parameters [n_layer, ...] become one
tensor per layer.

Vocab padding: the embedding (and untied head) keep their padded size `padded_vocab_size`.
- layout="transformers": transformers has no padding, so the config's `vocab_size` is the padded
  size (the unpadded size is not representable there).
- layout="native": mamba_ssm pads `vocab_size` up to `pad_vocab_size_multiple` itself, so the
  config keeps the unpadded size and the multiple, which reproduce the same shape.

Tied heads: transformers drops `lm_head.weight` when `tie_word_embeddings` (its own
save_pretrained does); mamba_ssm's state dict holds it (the tied tensor), so the native layout
includes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from longmamba_jax.checkpoints.torch_format import flatten, torch_key
from longmamba_jax.config import Config, Mamba2Config, MambaConfig

LAYOUTS = ("transformers", "native")
WEIGHTS_FORMATS = ("safetensors", "bin")

_ST_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
}


# ---------------------------------------------------------------------------------------------
# Configs.

def to_hf_config(config: Config) -> dict:
    """The transformers `MambaConfig` / `Mamba2Config` dict of `config`.

    `vocab_size` is the padded vocabulary (transformers checkpoints store the embedding at its
    final size). `time_step_limit` may hold inf, which `json.dumps` writes as `Infinity` (read
    back by `json.loads`, transformers and `longmamba_jax.config.from_dict`).
    """
    if not isinstance(config, (MambaConfig, Mamba2Config)):
        from longmamba_jax.hybrid.config import to_hf_hybrid

        return to_hf_hybrid(config)
    common = {
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "state_size": config.d_state,
        "expand": config.expand,
        "conv_kernel": config.d_conv,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": config.residual_in_fp32,
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if isinstance(config, MambaConfig):
        out = {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            **common,
            "intermediate_size": config.d_inner,
            "time_step_rank": config.dt_rank,
        }
        if config.mixer_rms_eps is not None:
            out.update(architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba",
                       mixer_rms_eps=config.mixer_rms_eps)
        return out
    if isinstance(config, Mamba2Config):
        return {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            **common,
            "num_heads": config.nheads,
            "head_dim": config.headdim,
            "n_groups": config.ngroups,
            "chunk_size": config.chunk_size,
            "time_step_limit": list(config.dt_limit),
        }
    raise TypeError(f"config must be MambaConfig or Mamba2Config, got {type(config).__name__}")


def to_native_config(config: Config) -> dict:
    """The mamba_ssm native `config.json` dict of `config` (`ssm_cfg` holds the mixer geometry).

    `vocab_size` stays unpadded with its `pad_vocab_size_multiple`, so mamba_ssm pads it to the
    same embedding shape. A non-default `norm_eps` is written as `norm_epsilon` (read by
    `from_dict`; mamba_ssm's own config class has no such key).
    """
    if isinstance(config, MambaConfig) and config.mixer_rms_eps is None:
        ssm = {"layer": "Mamba1", "d_state": config.d_state, "d_conv": config.d_conv,
               "expand": config.expand,
               "dt_rank": "auto" if config.dt_rank == math.ceil(config.d_model / 16)
               else config.dt_rank,
               "conv_bias": config.conv_bias, "bias": config.bias}
    elif isinstance(config, Mamba2Config):
        ssm = {"layer": "Mamba2", "d_state": config.d_state, "d_conv": config.d_conv,
               "expand": config.expand, "headdim": config.headdim, "ngroups": config.ngroups,
               "chunk_size": config.chunk_size, "conv_bias": config.conv_bias,
               "bias": config.bias}
        if config.dt_limit != (0.0, math.inf):
            ssm["dt_limit"] = list(config.dt_limit)
    else:
        raise ValueError(f"{config.family} has no mamba_ssm native layout (use "
                         "layout='transformers')")
    out = {
        "d_model": config.d_model,
        "d_intermediate": 0,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": ssm,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }
    if config.norm_eps != 1e-5:
        out["norm_epsilon"] = config.norm_eps
    return out


# ---------------------------------------------------------------------------------------------
# State dicts.

def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and path[-2] == "conv1d":  # [K, C] -> [C, 1, K]
        return value.T[:, None, :]
    if path[-1] == "kernel":  # [in, out] -> [out, in]
        return value.T
    return value


def iter_torch_tensors(params, layout: str = "transformers") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (torch key, array) one tensor at a time; arrays are views where possible."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    native = layout == "native"
    config = params.config
    if not isinstance(config, (MambaConfig, Mamba2Config)):
        if native:
            raise ValueError(f"{config.family} has no mamba_ssm native layout (use "
                             "layout='transformers')")
        yield from _hybrid_tensors(params)
        return
    for path, leaf in flatten(params.weights):
        array = np.asarray(leaf)
        if path[0] == "layers":
            if array.shape[0] != config.n_layer:
                raise ValueError(f"parameter {'/'.join(path)} has {array.shape[0]} layers, the "
                                 f"config n_layer={config.n_layer}")
            for layer in range(config.n_layer):
                yield torch_key(path, layer, native), _to_torch_layout(path, array[layer])
        else:
            yield torch_key(path, None, native), _to_torch_layout(path, array)
            if path == ("embedding", "weight") and native and config.tie_embeddings:
                yield "lm_head.weight", array


def _hybrid_tensors(params) -> Iterator[tuple[str, np.ndarray]]:
    """A hybrid model's tensors (each stacked group one tensor per slot); tied copies (Zamba2's
    later uses of a shared block, a tied head) are left out, as transformers saves them."""
    from longmamba_jax.checkpoints.torch_format import key_table

    table = key_table(params.config)
    for path, leaf in flatten(params.weights):
        array = np.asarray(leaf)
        if path[0] in ("embedding", "norm_f", "lm_head"):
            yield table.torch_key(path, None), _to_torch_layout(path, array)
            continue
        for slot in range(array.shape[0]):
            yield table.torch_key(path, slot), _to_torch_layout(path, array[slot])


def torch_state_dict(params, layout: str = "transformers") -> dict[str, np.ndarray]:
    """The torch state dict of `params` as numpy arrays (views of the JAX buffers where possible).

    Args:
      params: `Params`.
      layout: "transformers" (`backbone.embeddings.weight`, no `lm_head.weight` when tied) or
        "native" (mamba_ssm: `backbone.embedding.weight`, `lm_head.weight` always present).

    Returns:
      {torch key: array} in torch shapes; bf16 parameters come out as ml_dtypes.bfloat16.
    """
    return dict(iter_torch_tensors(params, layout))


# ---------------------------------------------------------------------------------------------
# Writing.

def write_safetensors(path, tensors, metadata: dict | None = None) -> None:
    """Writes a .safetensors file one tensor at a time (no full in-memory copy).

    Args:
      path: output file.
      tensors: {key: numpy array}; bf16 as ml_dtypes.bfloat16.
      metadata: string -> string header metadata (default {"format": "pt"}, which transformers
        requires).
    """
    header: dict = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    keys = sorted(tensors)
    for key in keys:
        array = tensors[key]
        name = _ST_NAMES.get(np.dtype(array.dtype))
        if name is None:
            raise ValueError(f"tensor {key!r}: dtype {array.dtype} cannot be written to "
                             "safetensors here")
        nbytes = int(array.size) * array.dtype.itemsize
        header[key] = {"dtype": name, "shape": list(array.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in keys:
            f.write(np.ascontiguousarray(tensors[key]).tobytes(order="C") if tensors[key].size
                    else b"")


def _write_torch_bin(path, tensors) -> None:
    import torch

    state, shared = {}, {}
    for key, array in tensors.items():
        ident = id(array)
        if ident in shared:  # keep a tied tensor tied (torch.save stores the storage once)
            state[key] = shared[ident]
            continue
        contiguous = np.ascontiguousarray(array)
        if not contiguous.flags.writeable:  # torch.from_numpy wants writable memory
            contiguous = contiguous.copy()
        if contiguous.dtype == np.dtype(ml_dtypes.bfloat16):
            tensor = torch.from_numpy(contiguous.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(contiguous)
        state[key] = shared[ident] = tensor
    torch.save(state, path)


def export_torch(params, out_dir, *, layout: str = "transformers",
                 weights_format: str = "safetensors", force: bool = False) -> Path:
    """Writes `params` as a torch checkpoint directory: `config.json` plus the weights.

    Written atomically (a temporary directory renamed into place). The result loads with
    `longmamba_jax.load`, and in the transformers layout with
    `transformers.AutoModelForCausalLM.from_pretrained`.

    Args:
      params: `Params`.
      out_dir: output directory; must not exist unless `force`.
      layout: "transformers" or "native" (mamba_ssm), see the module docstring.
      weights_format: "safetensors" (`model.safetensors`) or "bin" (`pytorch_model.bin` via
        torch.save, which is what mamba_ssm's `from_pretrained` reads).
      force: replace an existing output directory (only after the new one is complete).

    Returns:
      The output directory.
    """
    from longmamba_jax.checkpoints.atomic import atomic_directory
    from longmamba_jax.quantization import refuse_quantized

    refuse_quantized(params, "export_torch")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights_format must be one of {WEIGHTS_FORMATS}, got "
                         f"{weights_format!r}")
    config = params.config
    if layout == "transformers":
        cfg = {**to_hf_config(config), "dtype": str(np.dtype(params.dtype))}
    else:
        cfg = to_native_config(config)
    tensors = torch_state_dict(params, layout)
    with atomic_directory(out_dir, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if weights_format == "safetensors":
            write_safetensors(tmp / "model.safetensors", tensors)
        else:
            _write_torch_bin(tmp / "pytorch_model.bin", tensors)
    return Path(out_dir).absolute()
