"""Parity of `longmamba_jax.forward` with the transformers torch models.

Checkpoints are written by `save_pretrained` (transformers layout) or in the mamba_ssm native
layout, then loaded through `longmamba_jax.load(dir)` like a user would.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from torch_models import make_torch_model, rel_err, save_hf, save_native, torch_logits

import longmamba_jax as lmj

pytestmark = pytest.mark.torch

BACKENDS = ["reference", "associative"]

# name -> (arch, transformers config overrides)
MODELS = {
    "mamba2-g1-untied": ("mamba2", dict(n_groups=1, tie_word_embeddings=False)),
    "mamba2-g2-tied": ("mamba2", dict(n_groups=2, tie_word_embeddings=True)),
    "mamba2-hd16-ds12": ("mamba2", dict(n_groups=2, head_dim=16, state_size=12, chunk_size=5,
                                        use_bias=True)),
    "mamba1-tied": ("mamba1", dict(tie_word_embeddings=True)),
    "mamba1-untied-bias": ("mamba1", dict(tie_word_embeddings=False, use_bias=True,
                                          time_step_rank=3)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (arch, overrides) in MODELS.items():
        model = make_torch_model(arch, **overrides)
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(name)))
    return out


def _tokens(batch, length, seed=0, vocab=67):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 3), (2, 37), (1, 300)])
def test_fp32_logits_match_torch(checkpoints, name, backend, batch, length):
    model, directory = checkpoints[name]
    params = lmj.load(directory)
    tokens = _tokens(batch, length, seed=length)
    ref = torch_logits(model, tokens)
    out = np.asarray(lmj.forward(params, tokens, backend=backend))
    assert out.dtype == np.float32
    assert out.shape == (batch, length, params.config.padded_vocab_size)
    assert rel_err(out[..., : ref.shape[-1]], ref) <= 1e-5


@pytest.mark.parametrize("name", ["mamba2-hd16-ds12", "mamba2-g1-untied", "mamba2-g2-tied",
                                  "mamba1-untied-bias"])
def test_pallas_interpret_backend_matches_torch(checkpoints, name):
    """The Pallas kernels (through the interpreter here; compiled on GPU) inside the model.
    mamba2-g1-untied (one group of 64 channels) also takes the gated-norm kernel; mamba2-g2-tied
    (x | B | C = 64 | 16 | 16) and mamba1-untied-bias (x = 64) take the conv kernel, the others'
    B and C widths (8, 24) are not multiples of 16 and keep the jnp conv."""
    model, directory = checkpoints[name]
    params = lmj.load(directory)
    tokens = _tokens(2, 21, seed=5)
    ref = torch_logits(model, tokens)
    out = np.asarray(lmj.forward(params, tokens, backend="pallas-interpret"))
    assert rel_err(out[..., : ref.shape[-1]], ref) <= 1e-5


@pytest.mark.parametrize("name", ["mamba2-g2-tied", "mamba1-untied-bias"])
def test_pallas_interpret_chunked_prefill_matches_one_shot(checkpoints, name):
    """Prefill in two chunks through the Pallas kernels: the second chunk's conv reads the
    first's last inputs from the cache (the conv kernel's initial state) and its scans start
    from the first's state, so logits and the final cache equal one 21-token prefill."""
    _, directory = checkpoints[name]
    params = lmj.load(directory)
    tokens = _tokens(2, 21, seed=9)
    full, cache_full = lmj.prefill(params, tokens, backend="pallas-interpret")
    first, cache = lmj.prefill(params, tokens[:, :13], backend="pallas-interpret")
    second, cache = lmj.prefill(params, tokens[:, 13:], cache=cache, backend="pallas-interpret")
    assert rel_err(np.asarray(second), np.asarray(full)) <= 1e-5
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_full), strict=True):
        assert rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= 1e-5


@pytest.mark.parametrize("name", ["mamba2-g2-tied", "mamba1-untied-bias"])
def test_bf16_params_match_torch(checkpoints, name):
    model, directory = checkpoints[name]
    params = lmj.load(directory, dtype="bfloat16")
    assert params.dtype == np.dtype("bfloat16")
    tokens = _tokens(2, 45)
    out = np.asarray(lmj.forward(params, tokens, backend="associative"))
    assert not np.isnan(out).any()
    import torch

    ref_bf16 = torch_logits(model, tokens, dtype=torch.bfloat16)
    model.float()
    ref_fp32 = torch_logits(model, tokens)
    assert rel_err(out[..., : ref_bf16.shape[-1]], ref_bf16) <= 2e-2
    assert rel_err(out[..., : ref_fp32.shape[-1]], ref_fp32) <= 2e-2


@pytest.mark.parametrize("arch,overrides", [
    ("mamba2", dict(n_groups=2, vocab_size=64, tie_word_embeddings=True)),
    ("mamba1", dict(vocab_size=64, tie_word_embeddings=True)),
])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_native_layout_checkpoint(tmp_path, arch, overrides, fmt):
    """mamba_ssm layout: native keys, ssm_cfg, vocab 61 padded to 64 by the multiple 16."""
    model = make_torch_model(arch, **overrides)
    directory = save_native(model, tmp_path / "native", vocab_size=61, pad_multiple=16, fmt=fmt)
    params = lmj.load(directory)
    assert params.config.vocab_size == 61
    assert params.config.padded_vocab_size == 64
    tokens = _tokens(2, 29, vocab=61)
    ref = torch_logits(model, tokens)
    out = np.asarray(lmj.forward(params, tokens, backend="associative"))
    assert rel_err(out, ref) <= 1e-5


def test_native_defaults_applied(tmp_path):
    """A native Mamba2 config.json that omits the mixer geometry takes mamba_ssm's defaults."""
    model = make_torch_model("mamba2", hidden_size=64, head_dim=64, state_size=128,
                             n_groups=1, vocab_size=64, chunk_size=256, tie_word_embeddings=True)
    directory = save_native(model, tmp_path / "n", vocab_size=64, pad_multiple=16)
    import json

    cfg = json.loads((directory / "config.json").read_text())
    cfg["ssm_cfg"] = {"layer": "Mamba2"}
    (directory / "config.json").write_text(json.dumps(cfg))
    params = lmj.load(directory)
    c = params.config
    assert (c.d_state, c.headdim, c.expand, c.ngroups, c.d_conv, c.chunk_size) == \
        (128, 64, 2, 1, 4, 256)
    tokens = _tokens(1, 20, vocab=64)
    assert rel_err(np.asarray(lmj.forward(params, tokens)), torch_logits(model, tokens)) <= 1e-5
