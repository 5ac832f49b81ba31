"""Prints the parity tables of the README: `longmamba_jax.forward` vs transformers' torch models.

    python evals/bench/parity_table.py                 # Mamba / Mamba2, then the families
    python evals/bench/parity_table.py --families-only

Tiny random checkpoints (every weight perturbed away from its init) are written with
`save_pretrained`, loaded through `longmamba_jax.load`, and compared at several lengths; the
worst relative error ‖ours − torch‖ / ‖torch‖ per model, backend and dtype is printed. The
other families (FalconMamba, Codestral Mamba's geometry, Zamba2, Bamba) start from this
library's tiny configs (`config.tiny_config`), perturbed, written with `export_torch` in the
transformers layout and read back by transformers' own class of each; fp32, `reference` backend.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def families() -> list[tuple[str, float, float]]:
    """Per family, at (1, 3), (2, 19) and (1, 40) tokens: the worst fp32 relative error against
    transformers, and transformers' own fp32 against its fp64."""
    import jax

    from longmamba_jax.config import tiny_config

    configs = {"falcon_mamba": tiny_config("falcon_mamba"),
               "codestral (ngroups 8)": tiny_config("mamba2", d_model=64, headdim=8, ngroups=8,
                                                       tie_embeddings=False),
               "zamba2": tiny_config("zamba2"), "bamba": tiny_config("bamba")}
    rows = []
    for name, config in configs.items():
        params = lmj.init_params(config, 0)
        leaves, treedef = jax.tree.flatten(params.weights)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [w + 0.1 * jax.random.normal(k, w.shape, w.dtype)
                 for w, k in zip(leaves, keys, strict=True)]
        params = dataclasses.replace(params, weights=jax.tree.unflatten(treedef, noisy))
        with tempfile.TemporaryDirectory() as d:
            lmj.export_torch(params, d, force=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        # torch in fp64: how far fp32 itself is from exact on this model (its conditioning)
        model64 = transformers.AutoModelForCausalLM.from_config(model.config).double().eval()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        worst = torch_own = 0.0
        for batch, length in [(1, 3), (2, 19), (1, 40)]:
            tokens = torch.as_tensor(np.random.default_rng(length).integers(
                0, config.vocab_size, (batch, length)))
            with torch.no_grad():
                ref, ref64 = model(tokens).logits.numpy(), model64(tokens).logits.numpy()
            ours = np.asarray(lmj.forward(params, tokens.numpy(), backend="reference"))
            worst = max(worst, rel_err(ours[..., :ref.shape[-1]], ref))
            torch_own = max(torch_own, rel_err(ref, ref64))
        rows.append((name, worst, torch_own))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families-only", action="store_true")
    args = p.parse_args(argv)
    if not args.families_only:
        mamba_table()
    print("\n| family | ours vs torch, fp32 | torch fp32 vs torch fp64 |")
    print("|---|---|---|")
    for name, err, torch_own in families():
        print(f"| {name} | {err:.1e} | {torch_own:.1e} |")


def mamba_table():
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
