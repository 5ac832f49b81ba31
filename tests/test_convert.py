"""The converter (`python -m convert`) on checkpoints these tests build themselves.

Tiny random transformers models (save_pretrained) and mamba_ssm native directories written here
(native key names, `ssm_cfg`, unpadded vocab + pad_vocab_size_multiple, `pytorch_model.bin` via
torch.save, `.safetensors`, sharded safetensors with an index), a hub cache laid out in a temp
dir under real ids (offline), and every bad input of the issue. Conversions run in-process
through `main(argv)`; two runs go through a subprocess (`python -m convert` from the repo root,
and the `longmamba-convert` console script).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import longmamba_jax as lmj  # noqa: E402
from longmamba_convert import verify as verify_module  # noqa: E402
from longmamba_convert.cli import main  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parent.parent
TOKENS = np.random.default_rng(1).integers(0, 61, (2, 13))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------------------------------------
# Checkpoints built here.

def _hf_mamba2(tie: bool, seed: int):
    cfg = transformers.Mamba2Config(
        hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, head_dim=16,
        num_heads=4, n_groups=1, expand=2, chunk_size=8, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.Mamba2ForCausalLM(cfg).eval()


def _hf_mamba1(tie: bool, seed: int):
    cfg = transformers.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=64,
                                   state_size=4, expand=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.MambaForCausalLM(cfg).eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS), use_cache=False).logits.float().numpy()


def _native_state(model) -> dict[str, np.ndarray]:
    """A transformers model's weights under mamba_ssm's names (tied head included)."""
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().numpy().copy()
             for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["backbone.embedding.weight"].copy())
    return state


def _native_config(model, *, layer: str, vocab: int, pad: int, tie: bool) -> dict:
    c = model.config
    ssm = {"layer": layer, "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand}
    if layer == "Mamba2":
        ssm.update(headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size)
    return {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
            "vocab_size": vocab, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "pad_vocab_size_multiple": pad, "tie_embeddings": tie}


def _write_bin(path: Path, state: dict[str, np.ndarray]) -> None:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (directory, reference logits) for every supported format."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    m2 = _hf_mamba2(tie=False, seed=0)
    m2.save_pretrained(root / "hf-mamba2")
    out["hf-mamba2"] = (root / "hf-mamba2", _logits(m2))
    m2.save_pretrained(root / "hf-mamba2-sharded", max_shard_size="40KB")
    out["hf-mamba2-sharded"] = (root / "hf-mamba2-sharded", out["hf-mamba2"][1])
    m1 = _hf_mamba1(tie=True, seed=1)
    m1.save_pretrained(root / "hf-mamba1")
    out["hf-mamba1"] = (root / "hf-mamba1", _logits(m1))
    # mamba_ssm native: Mamba2 as pytorch_model.bin (like state-spaces/mamba2-*), tied head,
    # vocab 61 padded to 64 by pad_vocab_size_multiple 16.
    n2 = _hf_mamba2(tie=True, seed=2)
    d = root / "native-mamba2-bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        _native_config(n2, layer="Mamba2", vocab=61, pad=16, tie=True)))
    _write_bin(d / "pytorch_model.bin", _native_state(n2))
    out["native-mamba2-bin"] = (d, _logits(n2))
    # mamba_ssm native Mamba-1 as model.safetensors; vocab 61 padded to 64 by 8.
    n1 = _hf_mamba1(tie=True, seed=3)
    d = root / "native-mamba1-st"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        _native_config(n1, layer="Mamba1", vocab=61, pad=8, tie=True)))
    safetensors_numpy.save_file(_native_state(n1), d / "model.safetensors",
                                metadata={"format": "pt"})
    out["native-mamba1-st"] = (d, _logits(n1))
    # mamba_ssm native Mamba2, untied, sharded safetensors written by hand with an index.
    n3 = _hf_mamba2(tie=False, seed=4)
    d = root / "native-mamba2-shards"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        _native_config(n3, layer="Mamba2", vocab=61, pad=16, tie=False)))
    state = _native_state(n3)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        safetensors_numpy.save_file({k: state[k] for k in names}, d / name,
                                    metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    out["native-mamba2-shards"] = (d, _logits(n3))
    return out


@pytest.fixture(scope="module")
def hub_cache(ckpts, tmp_path_factory):
    """An HF hub cache laid out by hand under real ids (snapshots/<commit> + refs/main)."""
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    for repo_id, name in (("state-spaces/mamba2-1.3b", "native-mamba2-bin"),
                          ("state-spaces/mamba-130m-hf", "hf-mamba1")):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(ckpts[name][0], repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """HF_HOME / HF_HUB_CACHE in the temp dir and HF_HUB_OFFLINE=1, for this process too."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_logits(out_dir: Path, ref: np.ndarray, rtol: float = 1e-5) -> lmj.Params:
    params = lmj.load(out_dir)
    ours = np.asarray(lmj.forward(params, TOKENS))
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err <= rtol, err
    return params


def _error_lines(stderr: str) -> list[str]:
    """stderr minus the progress bar: exactly the error line(s)."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    others = [ln for ln in lines if not ln.startswith("tensors:")]
    assert all(ln.startswith("error: ") for ln in others), stderr
    return others


def _snapshot(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------------
# Formats and output.

@pytest.mark.parametrize("name", ["hf-mamba2", "hf-mamba2-sharded", "hf-mamba1",
                                  "native-mamba2-bin", "native-mamba1-st",
                                  "native-mamba2-shards"])
def test_converts_every_format_and_matches_torch(name, ckpts, tmp_path, capsys):
    src, ref = ckpts[name]
    out = tmp_path / "out"
    code, stdout, stderr = _run(["--hf", src, "--out", out], capsys)
    assert code == 0, stderr
    assert "max relative error" in stdout
    params = _check_logits(out, ref)
    assert params.dtype == np.float32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == str(src) and manifest["source_kind"] == "local"
    assert manifest["dtype"] == "float32"
    assert manifest["library_version"] == lmj.__version__
    assert manifest["config_fingerprint"] == params.config.fingerprint
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["rel_norm_err"] <= 1e-4
    inputs = {p.name for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".bin")
              and p.name != "generation_config.json"}
    assert set(manifest["input_files"]) == inputs
    for fname, entry in manifest["input_files"].items():
        assert entry["sha256"] == hashlib.sha256((src / fname).read_bytes()).hexdigest()
    assert _leftovers(tmp_path, "out") == []


def test_native_vocab_padding_and_tied_head_are_explicit(ckpts, tmp_path, capsys):
    src, _ = ckpts["native-mamba2-bin"]
    out = tmp_path / "out"
    assert _run(["--hf", src, "--out", out, "--no-verify"], capsys)[0] == 0
    params = lmj.load(out)
    assert params.config.vocab_size == 61 and params.config.padded_vocab_size == 64
    assert params.config.tie_embeddings and "lm_head" not in params.weights
    assert params.weights["embedding"]["weight"].shape == (64, 32)
    stored = json.loads((out / "longmamba_config.json").read_text())
    assert stored["config"]["vocab_size"] == 61
    assert stored["config"]["pad_vocab_size_multiple"] == 16


def test_bfloat16_conversion(ckpts, tmp_path, capsys):
    src, ref = ckpts["hf-mamba2"]
    out = tmp_path / "out"
    code, stdout, stderr = _run(["--hf", src, "--out", out, "--dtype", "bfloat16"], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["verification"]["tolerance"] == 2e-2
    params = _check_logits(out, ref, rtol=2e-2)
    assert all(str(a.dtype) == "bfloat16" for a in jax.tree.leaves(params.weights))


def test_verification_skipped_without_torch(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify_module, "torch_unavailable", lambda: "torch is not installed")
    out = tmp_path / "out"
    code, stdout, _ = _run(["--hf", ckpts["hf-mamba1"][0], "--out", out], capsys)
    assert code == 0
    assert "verification skipped" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"] == {"skipped": "torch is not installed"}


def test_failed_verification_writes_nothing(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(verify_module.TOLERANCE, "float32", 0.0)
    out = tmp_path / "out"
    code, _, stderr = _run(["--hf", ckpts["hf-mamba1"][0], "--out", out], capsys)
    assert code == 1
    assert "verification failed" in stderr and "Traceback" not in stderr
    assert not out.exists() and _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------
# Hub ids through an offline cache.

def test_hub_id_from_offline_cache(ckpts, offline, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = _run(["--hf", "state-spaces/mamba2-1.3b", "--out", out], capsys)
    assert code == 0, stderr
    _check_logits(out, ckpts["native-mamba2-bin"][1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "state-spaces/mamba2-1.3b"
    assert manifest["source_kind"] == "hub" and manifest["resolved_commit"] == COMMIT
    out2 = tmp_path / "out2"
    code, _, stderr = _run(["--hf", "state-spaces/mamba-130m-hf", "--out", out2,
                            "--revision", COMMIT, "--no-verify"], capsys)
    assert code == 0, stderr
    assert json.loads((out2 / "manifest.json").read_text())["revision"] == COMMIT
    _check_logits(out2, ckpts["hf-mamba1"][1])


def test_hub_id_offline_not_cached(offline, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = _run(["--hf", "state-spaces/mamba-2.8b", "--out", out], capsys)
    assert code == 1
    assert "state-spaces/mamba-2.8b" in stderr and "not in the local Hugging Face cache" in stderr
    assert "local directory" in stderr and "Traceback" not in stderr
    assert len(_error_lines(stderr)) == 1
    assert not out.exists()


def _subprocess_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cache.parent), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TQDM_DISABLE="1", JAX_PLATFORMS="cpu")
    return env


def test_python_dash_m_convert_from_repo_root(ckpts, hub_cache, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "convert", "--hf", "state-spaces/mamba2-1.3b", "--out", str(out)],
        cwd=REPO, env=_subprocess_env(hub_cache), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max relative error" in proc.stdout
    _check_logits(out, ckpts["native-mamba2-bin"][1])


def test_console_script(ckpts, hub_cache, tmp_path):
    script = Path(sys.executable).parent / "longmamba-convert"
    if not script.exists():
        pytest.fail(f"console script missing: {script} (pip install -e .)")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(script), "--hf", "state-spaces/mamba-130m-hf", "--out", str(out), "--no-verify"],
        cwd=tmp_path, env=_subprocess_env(hub_cache), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _check_logits(out, ckpts["hf-mamba1"][1])
    # Offline and not cached, through the real environment variables: one clean line.
    proc = subprocess.run(
        [str(script), "--hf", "state-spaces/not-cached", "--out", str(tmp_path / "x")],
        cwd=tmp_path, env=_subprocess_env(hub_cache), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "not in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# --force.

@pytest.fixture(scope="module")
def previous_output(ckpts, tmp_path_factory):
    """A finished conversion to stand in for an existing --out."""
    out = tmp_path_factory.mktemp("prev") / "out"
    assert main(["--hf", str(ckpts["hf-mamba1"][0]), "--out", str(out), "--no-verify"]) == 0
    return out


def _existing(previous_output, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(previous_output, out)
    return out


def test_refuses_to_overwrite_without_force(ckpts, previous_output, tmp_path, capsys):
    out = _existing(previous_output, tmp_path)
    before = _snapshot(out)
    code, _, stderr = _run(["--hf", ckpts["hf-mamba2"][0], "--out", out], capsys)
    assert code == 1 and "already exists" in stderr and "--force" in stderr
    assert _snapshot(out) == before


def test_force_replaces_after_success(ckpts, previous_output, tmp_path, capsys):
    out = _existing(previous_output, tmp_path)
    code, _, stderr = _run(["--hf", ckpts["hf-mamba2"][0], "--out", out, "--force",
                            "--no-verify"], capsys)
    assert code == 0, stderr
    assert lmj.load(out).config.arch == "mamba2"
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("kind", ["file", "foreign-dir"])
def test_force_never_replaces_something_else(kind, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    before = _snapshot(out) if out.is_dir() else out.read_text()
    code, _, stderr = _run(["--hf", ckpts["hf-mamba1"][0], "--out", out, "--force"], capsys)
    assert code == 1 and "refusing to replace" in stderr
    assert (_snapshot(out) if out.is_dir() else out.read_text()) == before


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and key, exit 1, --out untouched, nothing runs.

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_safetensors(path: Path, edit) -> None:
    state = dict(safetensors_numpy.load_file(path))
    edit(state)
    safetensors_numpy.save_file(state, path, metadata={"format": "pt"})


class _Payload:
    """Unpickling this creates a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_missing_key(d: Path):
    _edit_safetensors(d / "model.safetensors",
                      lambda s: s.pop("backbone.layers.1.mixer.D"))
    return str(d), "backbone.layers.1.mixer.D"  # in no file: the directory is named


def _bad_unexpected_key(d: Path):
    _edit_safetensors(d / "model.safetensors", lambda s: s.update(
        {"backbone.layers.0.mixer.extra.weight": np.zeros((2, 2), np.float32)}))
    return "model.safetensors", "backbone.layers.0.mixer.extra.weight"


def _bad_shape(d: Path):
    _edit_safetensors(d / "model.safetensors", lambda s: s.update(
        {"backbone.layers.0.mixer.A_log": np.zeros((5,), np.float32)}))
    return "model.safetensors", "backbone.layers.0.mixer.A_log"


def _bad_schema(d: Path):
    (d / "config.json").write_text(json.dumps({"hidden": 32, "layers": 2}))
    return "config.json", "unknown config schema"


def _bad_truncated(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "model.safetensors", "truncated"


def _bad_header(d: Path):
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"\xff{garbage" + raw[18:])
    return "model.safetensors", "corrupt"


def _bad_config_shapes(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["state_size"] = 16  # the tensors were made with 8
    (d / "config.json").write_text(json.dumps(cfg))
    return "model.safetensors", "config"


def _bad_missing_shard(d: Path):
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return "model.safetensors.index.json", shard.name


BAD = {
    "missing-key": ("hf-mamba2", _bad_missing_key),
    "unexpected-key": ("hf-mamba2", _bad_unexpected_key),
    "shape-mismatch": ("hf-mamba2", _bad_shape),
    "unknown-schema": ("hf-mamba2", _bad_schema),
    "truncated-safetensors": ("hf-mamba2", _bad_truncated),
    "corrupt-header": ("hf-mamba2", _bad_header),
    "config-contradicts-shapes": ("hf-mamba2", _bad_config_shapes),
    "missing-shard": ("native-mamba2-shards", _bad_missing_shard),
}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "force-over-existing"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(case, existing, ckpts, previous_output, tmp_path, capsys):
    base, corrupt = BAD[case]
    src = _copy(ckpts[base][0], tmp_path / "src")
    fname, needle = corrupt(src)
    out = _existing(previous_output, tmp_path) if existing else tmp_path / "out"
    before = _snapshot(out)
    argv = ["--hf", src, "--out", out] + (["--force"] if existing else [])
    code, _, stderr = _run(argv, capsys)
    assert code == 1
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert fname in lines[0] and needle in lines[0], stderr
    assert _snapshot(out) == before
    assert out.exists() == existing
    assert _leftovers(tmp_path, "out") == []


def test_malicious_pickle_is_refused_and_never_runs(ckpts, tmp_path, capsys):
    src = _copy(ckpts["native-mamba2-bin"][0], tmp_path / "src")
    marker = tmp_path / "PWNED"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["backbone.norm_f.weight"] = _Payload(str(marker))
    torch.save(state, src / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, stderr = _run(["--hf", src, "--out", out], capsys)
    assert code == 1
    assert "pytorch_model.bin" in stderr and "refused" in stderr and "Traceback" not in stderr
    assert not marker.exists()
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_unsupported_config_fails_with_key(ckpts, tmp_path, capsys):
    src = _copy(ckpts["native-mamba2-bin"][0], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["attn_layer_idx"] = [1]
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, stderr = _run(["--hf", src, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "config.json" in stderr and "attn_layer_idx" in stderr
    assert not (tmp_path / "out").exists()


def test_missing_local_directory(tmp_path, capsys):
    code, _, stderr = _run(["--hf", tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "nope" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--hf", "x"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--hf", "x", "--out", "y", "--dtype", "float64"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_help_names_the_command_that_was_run(capsys):
    """`longmamba-convert --help` and `python -m convert --help` each show their own name."""
    from longmamba_convert.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: longmamba-convert ")
    proc = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m convert ")
