"""Installing or running longmamba-jax must not shadow the PyPI packages `kernels`, `convert`
and `evals` (transformers probes for `kernels`), from the repo root or anywhere else."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, env_extra: dict | None = None) -> str:
    import os

    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_repo_dirs_are_not_regular_packages():
    # A regular package (with __init__.py) in the cwd would shadow an installed one.
    for name in ("kernels", "convert", "evals"):
        assert (ROOT / name).is_dir()
        assert not (ROOT / name / "__init__.py").exists(), name


def test_our_modules_import_under_their_own_names():
    out = _run("""
        import longmamba_kernels.ssd, longmamba_jax
        print(longmamba_kernels.ssd.__file__)
    """, cwd=Path("/"))
    assert str(ROOT / "kernels") in out


@pytest.mark.torch
def test_transformers_mamba2_runs_from_repo_root_and_does_not_see_our_kernels():
    pytest.importorskip("torch")
    out = _run("""
        import torch, transformers
        from transformers.utils.import_utils import is_kernels_available
        print("kernels_available", is_kernels_available())
        cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                        state_size=8, head_dim=16, num_heads=4, n_groups=1,
                                        chunk_size=8)
        model = transformers.Mamba2ForCausalLM(cfg).eval()
        with torch.no_grad():
            logits = model(torch.arange(10)[None]).logits
        print("finite", bool(torch.isfinite(logits).all()))
        import importlib.util
        spec = importlib.util.find_spec("kernels")
        print("kernels_spec_origin", None if spec is None else spec.origin)
    """, cwd=ROOT)
    assert "kernels_available False" in out
    assert "finite True" in out
    # From the repo root `kernels` can only be a namespace portion (origin None), never a module.
    assert "kernels_spec_origin None" in out


@pytest.mark.parametrize("name", ["kernels", "convert", "evals"])
def test_installed_package_of_the_same_name_wins_from_repo_root(tmp_path, name):
    """Stand-in for the PyPI package: a regular package later on sys.path must be the one
    imported even when the cwd is our repo root (where a same-named folder exists)."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("__version__ = '9.9.9'\nMARK = 'pypi'\n")
    out = _run(f"import {name}; print({name}.MARK, {name}.__version__)", cwd=ROOT,
               env_extra={"PYTHONPATH": str(site)})
    assert out.split() == ["pypi", "9.9.9"]
