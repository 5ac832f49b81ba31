"""Prints the parity table of the README: `longmamba_jax.forward` vs transformers' torch models.

    python evals/bench/parity_table.py

Tiny random checkpoints (every weight perturbed away from its init) are written with
`save_pretrained`, loaded through `longmamba_jax.load`, and compared at several lengths; the
worst relative error ‖ours − torch‖ / ‖torch‖ per model, backend and dtype is printed.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import transformers

import longmamba_jax as lmj
from longmamba_evals.bench.common import rel_err

MODELS = {
    "mamba2 g=1 untied": ("mamba2", dict(n_groups=1, tie_word_embeddings=False)),
    "mamba2 g=2 tied": ("mamba2", dict(n_groups=2, tie_word_embeddings=True)),
    "mamba2 g=2 headdim 16 d_state 12 bias": ("mamba2", dict(n_groups=2, state_size=12,
                                                             chunk_size=5, use_bias=True)),
    "mamba1 tied": ("mamba1", dict(tie_word_embeddings=True)),
    "mamba1 untied bias": ("mamba1", dict(tie_word_embeddings=False, use_bias=True,
                                          time_step_rank=3)),
}
SHAPES = [(1, 1), (2, 3), (2, 37), (1, 300)]


def build(arch, overrides, seed=0):
    torch.manual_seed(seed)
    if arch == "mamba2":
        cfg = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16,
                   expand=2, chunk_size=8)
        cfg.update(overrides)
        cfg["num_heads"] = cfg["hidden_size"] * cfg["expand"] // cfg["head_dim"]
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg))
    else:
        cfg = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2)
        cfg.update(overrides)
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def main():
    rows = []
    for name, (arch, overrides) in MODELS.items():
        model = build(arch, overrides)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            params = lmj.load(d)
            params_bf16 = lmj.load(d, dtype="bfloat16")
        refs = {}
        for batch, length in SHAPES:
            tokens = np.random.default_rng(length).integers(0, 67, (batch, length))
            with torch.no_grad():
                refs[(batch, length)] = (tokens, model(torch.as_tensor(tokens)).logits.numpy())
        for backend in ("reference", "associative", "pallas-interpret"):
            shapes = SHAPES if backend != "pallas-interpret" else SHAPES[:3]
            worst = max(rel_err(np.asarray(lmj.forward(params, t, backend=backend))
                                [..., :r.shape[-1]], r) for t, r in (refs[s] for s in shapes))
            rows.append((name, backend, "fp32", worst))
        worst = max(rel_err(np.asarray(lmj.forward(params_bf16, t, backend="associative"))
                        [..., :r.shape[-1]], r) for t, r in refs.values())
        rows.append((name, "associative", "bf16 params vs torch fp32", worst))
    print("| model | backend | dtype | worst relative error |")
    print("|---|---|---|---|")
    for name, backend, dtype, err in rows:
        print(f"| {name} | {backend} | {dtype} | {err:.1e} |")


if __name__ == "__main__":
    main()
