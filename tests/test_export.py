"""JAX -> torch export (`longmamba_jax.checkpoints.export`) and the converted format (`orbax_io`).

Round trips: export -> `longmamba_jax.load` gives the same weights (both layouts, safetensors
and .bin, fp32 and bf16); export in the transformers layout -> `from_pretrained` gives the
logits of `longmamba_jax.forward`; `save_converted` -> `load_converted`, and its errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.checkpoints import CheckpointError
from longmamba_jax.checkpoints.converted import atomic_directory, load_converted, save_converted
from longmamba_jax.checkpoints.export import (
    export_torch,
    to_hf_config,
    to_native_config,
    torch_state_dict,
)
from longmamba_jax.config import from_dict

CONFIGS = {
    "mamba2-tied": lmj.Mamba2Config.tiny(),  # vocab 61 padded to 64
    "mamba2-untied-groups": lmj.Mamba2Config.tiny(tie_embeddings=False, ngroups=2,
                                                  dt_limit=(0.0, 3.0)),
    "mamba1-tied": lmj.MambaConfig.tiny(),
    "mamba1-untied-bias": lmj.MambaConfig.tiny(tie_embeddings=False, bias=True, dt_rank=3),
}
TOKENS = np.random.default_rng(0).integers(0, 61, (2, 11))


@functools.cache
def _params(name: str, dtype=jnp.float32):
    return lmj.init_params(CONFIGS[name], seed=3, dtype=dtype)


def _assert_same_weights(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a.weights), \
        jax.tree_util.tree_flatten_with_path(b.weights)
    assert [p for p, _ in fa[0]] == [p for p, _ in fb[0]]
    for (path, x), (_, y) in zip(fa[0], fb[0], strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["transformers", "native"])
def test_export_roundtrip_identical_weights(name, layout, tmp_path):
    params = _params(name)
    out = export_torch(params, tmp_path / "exp", layout=layout)
    back = lmj.load(out)
    _assert_same_weights(params, back)
    cfg = params.config
    if layout == "native":
        assert back.config == cfg
    else:  # transformers has no vocab padding: the padded size becomes the vocab
        assert back.config == dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size,
                                                  pad_vocab_size_multiple=1)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_bin_and_bf16_roundtrip(dtype, tmp_path):
    pytest.importorskip("torch")
    params = _params("mamba2-tied", jnp.dtype(dtype))
    out = export_torch(params, tmp_path / "exp", layout="native", weights_format="bin")
    assert (out / "pytorch_model.bin").exists()
    back = lmj.load(out)
    _assert_same_weights(params, back)
    out2 = export_torch(params, tmp_path / "exp2", layout="transformers")
    _assert_same_weights(params, lmj.load(out2))


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = _params(name)
    out = export_torch(params, tmp_path / "exp", layout="transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == ("Mamba2ForCausalLM" if "mamba2" in name
                                    else "MambaForCausalLM")
    with torch.no_grad():
        ref = model(torch.from_numpy(TOKENS), use_cache=False).logits.numpy()
    ours = np.asarray(lmj.forward(params, TOKENS))
    assert ours.shape == ref.shape
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, err


def test_state_dict_keys_and_shapes():
    params = _params("mamba2-tied")
    cfg = params.config
    hf = torch_state_dict(params, "transformers")
    native = torch_state_dict(params, "native")
    assert "backbone.embeddings.weight" in hf and "lm_head.weight" not in hf
    assert "backbone.embedding.weight" in native and "lm_head.weight" in native
    assert hf["backbone.layers.1.mixer.in_proj.weight"].shape == (cfg.in_proj_dim, cfg.d_model)
    assert hf["backbone.layers.0.mixer.conv1d.weight"].shape == (cfg.conv_dim, 1, cfg.d_conv)
    assert native["lm_head.weight"].shape == (cfg.padded_vocab_size, cfg.d_model)
    with pytest.raises(ValueError, match="layout"):
        torch_state_dict(params, "mamba_ssm")


def test_configs():
    cfg = CONFIGS["mamba2-tied"]
    hf = to_hf_config(cfg)
    assert hf["model_type"] == "mamba2" and hf["vocab_size"] == 64
    assert hf["num_heads"] * hf["head_dim"] == cfg.d_inner
    native = to_native_config(cfg)
    assert native["vocab_size"] == 61 and native["pad_vocab_size_multiple"] == 16
    assert native["ssm_cfg"]["layer"] == "Mamba2" and "dt_limit" not in native["ssm_cfg"]
    assert from_dict(native) == cfg
    assert from_dict(json.loads(json.dumps(to_hf_config(CONFIGS["mamba2-untied-groups"])))) \
        .dt_limit == (0.0, 3.0)
    assert to_native_config(CONFIGS["mamba1-tied"])["ssm_cfg"]["dt_rank"] == "auto"
    assert to_native_config(CONFIGS["mamba1-untied-bias"])["ssm_cfg"]["dt_rank"] == 3


def test_export_is_atomic_and_refuses_overwrite(tmp_path):
    params = _params("mamba1-tied")
    out = export_torch(params, tmp_path / "exp")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_torch(params, out)
    export_torch(_params("mamba1-untied-bias"), out, force=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


# ---------------------------------------------------------------------------------------------
# The converted (Orbax) format.

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    params = _params("mamba2-untied-groups")
    out = tmp_path_factory.mktemp("conv") / "c"
    save_converted(params, out, manifest={"source": "test"})
    return params, out


def test_save_load_converted(converted):
    params, out = converted
    back = load_converted(out)
    _assert_same_weights(params, back)
    assert back.config == params.config
    assert lmj.load(out).config == params.config
    bf16 = load_converted(out, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(bf16.weights))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "test" and manifest["config_fingerprint"] == \
        params.config.fingerprint


def test_save_converted_refuses_non_empty(converted):
    params, out = converted
    with pytest.raises(FileExistsError):
        save_converted(params, out, manifest={})


def _corrupt_copy(converted, tmp_path, edit):
    _, out = converted
    dst = tmp_path / "c"
    shutil.copytree(out, dst)
    edit(dst)
    return dst


@pytest.mark.parametrize("case,match", [
    ("bad-json", "longmamba_config.json: not valid JSON"),
    ("bad-version", "format_version 99"),
    ("bad-config", "longmamba_config.json"),
    ("no-params", "missing the weights directory"),
    ("corrupt-params", r"params/\S+: 16 bytes, but longmamba_config.json records \d+ "
                       r"\(truncated or changed\)"),
    ("wrong-shapes", r"parameter layers/mixer/\S+ has shape .* implies"),
])
def test_load_converted_errors(case, match, converted, tmp_path):
    def edit(d):
        cfg_path = d / "longmamba_config.json"
        cfg = json.loads(cfg_path.read_text())
        if case == "bad-json":
            cfg_path.write_text("{not json")
        elif case == "bad-version":
            cfg["format_version"] = 99
            cfg_path.write_text(json.dumps(cfg))
        elif case == "bad-config":
            cfg["config"]["headdim"] = 7
            cfg_path.write_text(json.dumps(cfg))
        elif case == "no-params":
            shutil.rmtree(d / "params")
        elif case == "corrupt-params":
            for f in (d / "params").rglob("*"):
                if f.is_file() and f.stat().st_size > 1000:
                    f.write_bytes(b"\0" * 16)
            shutil.rmtree(d / "params" / "d", ignore_errors=True)
        elif case == "wrong-shapes":
            cfg["config"]["d_state"] = 16
            cfg_path.write_text(json.dumps(cfg))

    d = _corrupt_copy(converted, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_converted(d)


def test_load_converted_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_converted(tmp_path / "missing")
