"""Bad input and signals: each case ends in one clear error (or a clean exit status) and leaves
nothing behind. The converter runs in-process through `main(argv)`, except where a signal or a
second process is the point; those run `python -m convert` as a subprocess."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_convert.cli import main as convert_main
from longmamba_jax.checkpoints import CheckpointError
from longmamba_jax.checkpoints.export import export_torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Mamba2 exported as a transformers-layout safetensors checkpoint."""
    params = lmj.init_params(lmj.Mamba2Config.tiny(n_layer=2, d_state=8, headdim=8), seed=0)
    return export_torch(params, tmp_path_factory.mktemp("src") / "m")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _convert(argv, capsys):
    code = convert_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(stderr: str) -> list[str]:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("tensors:")]


def _siblings(path: Path) -> list[str]:
    """What a run left beside `path` (temporary directories, locks)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ---------------------------------------------------------------------------------------------
# A safetensors header length far beyond the file.

@pytest.mark.parametrize("header_len", [2**36, 2**60, 2**64 - 1])
def test_huge_safetensors_header_length_is_one_error(header_len, model_dir, tmp_path, capsys):
    src = _copy(model_dir, tmp_path / "src")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(header_len.to_bytes(8, "little") + raw[8:])
    out = tmp_path / "out"
    code, _, stderr = _convert(["--hf", src, "--out", out, "--no-verify"], capsys)
    assert code == 1
    lines = _error_lines(stderr)
    assert len(lines) == 1 and "model.safetensors" in lines[0], stderr
    assert "Traceback" not in stderr and "MemoryError" not in stderr
    assert not out.exists() and _siblings(out) == []
    for progress in (False, True):
        with pytest.raises(CheckpointError, match="model.safetensors.*header length"):
            lmj.load(src, progress=progress)
