"""Tiny random transformers Mamba/Mamba2 models for parity tests (the torch reference on CPU).

Every weight is perturbed away from its init (D, norms, A_log, dt_bias, conv bias included) so
that no term of the forward can hide behind an identity value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

torch = __import__("pytest").importorskip("torch", reason="torch is the parity reference")
transformers = __import__("pytest").importorskip("transformers")


def perturb(model, seed: int = 0, scale: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def make_torch_model(arch: str, seed: int = 0, **overrides):
    """A perturbed transformers MambaForCausalLM ('mamba1') or Mamba2ForCausalLM ('mamba2')."""
    torch.manual_seed(seed)
    if arch == "mamba2":
        cfg = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16,
                   n_groups=1, expand=2, chunk_size=8, tie_word_embeddings=False)
        cfg.update(overrides)
        cfg["num_heads"] = cfg["hidden_size"] * cfg["expand"] // cfg["head_dim"]
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg))
    elif arch == "mamba1":
        cfg = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2)
        cfg.update(overrides)
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg))
    else:
        raise ValueError(arch)
    return perturb(model, seed)


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return Path(directory)


def save_native(model, directory: Path, *, vocab_size: int, pad_multiple: int,
                fmt: str = "bin") -> Path:
    """Writes `model` in the mamba_ssm native layout: native key names, native config.json with
    ssm_cfg, unpadded vocab_size + pad_vocab_size_multiple, tied lm_head saved too (as
    mamba_ssm's save_pretrained does)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = model.config
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.contiguous()
    if hf.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    if hf.model_type == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": hf.state_size, "d_conv": hf.conv_kernel,
                   "expand": hf.expand, "headdim": hf.head_dim, "ngroups": hf.n_groups,
                   "chunk_size": hf.chunk_size}
    else:
        ssm_cfg = {"d_state": hf.state_size, "d_conv": hf.conv_kernel, "expand": hf.expand,
                   "dt_rank": hf.time_step_rank}
    config = {
        "d_model": hf.hidden_size, "d_intermediate": 0, "n_layer": hf.num_hidden_layers,
        "vocab_size": vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": bool(hf.tie_word_embeddings),
    }
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in state.items()}, directory / "model.safetensors")
    return directory


def torch_logits(model, tokens: np.ndarray, dtype=None) -> np.ndarray:
    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf in output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
