"""`longmamba_jax.load`: bad sources fail with one clear error naming the file (and key).

The converter's own bad-input cases (missing / unexpected keys, shapes, truncated and corrupt
safetensors, malicious pickles) are in test_convert.py; these are the `load` entry point's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.checkpoints import CheckpointError
from longmamba_jax.checkpoints.export import export_torch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    params = lmj.init_params(lmj.MambaConfig.tiny(), seed=0)
    return params, export_torch(params, tmp_path_factory.mktemp("exp") / "m", layout="native")


def test_load_roundtrip(exported):
    params, directory = exported
    back = lmj.load(directory)
    np.testing.assert_array_equal(np.asarray(back.weights["embedding"]["weight"]),
                                  np.asarray(params.weights["embedding"]["weight"]))
    assert lmj.load(str(directory), dtype=np.float32).dtype == np.float32


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        lmj.load(tmp_path / "missing")


def test_file_instead_of_directory(exported):
    _, directory = exported
    with pytest.raises(CheckpointError, match="is a file"):
        lmj.load(directory / "config.json")


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        lmj.load(tmp_path)


def test_no_weights(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        lmj.load(tmp_path)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        lmj.load(tmp_path)


def test_shard_index_names_missing_shard(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"backbone.norm_f.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors which is missing"):
        lmj.load(tmp_path)


def test_corrupt_shard_index(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        lmj.load(tmp_path)


def test_tiny_file_is_not_safetensors(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        lmj.load(tmp_path)


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*local "
                                                "directory"):
        lmj.load("state-spaces/mamba-130m")


def test_converted_directory_errors(tmp_path):
    (tmp_path / "longmamba_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="longmamba_config.json: not a longmamba-jax"):
        lmj.load(tmp_path)
