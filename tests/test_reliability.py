"""Bad input and signals: each case ends in one clear error (or a clean exit status) and leaves
nothing behind. The converter runs in-process through `main(argv)`, except where a signal or a
second process is the point; those run `python -m convert` as a subprocess."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_convert.cli import main as convert_main
from longmamba_jax.checkpoints import CheckpointError
from longmamba_jax.checkpoints.export import export_torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return lmj.init_params(lmj.Mamba2Config.tiny(n_layer=2, d_state=8, headdim=8), seed=1)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    """`tiny` exported as a transformers-layout safetensors checkpoint."""
    return export_torch(tiny, tmp_path_factory.mktemp("src") / "m")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _default_signals() -> None:
    """The usual dispositions of the converter's signals. A background job of a non-interactive
    shell starts with SIGINT ignored and `nohup` ignores SIGHUP; the converter keeps an
    ignored signal ignored (as it should), so the signal tests reset them first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in _SIGNALS[1:]:
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _signals_not_ignored():
    """Runs each test with the converter's signals not ignored (see `_default_signals`); the
    converter processes the tests start inherit that (a handler becomes the default at exec)."""
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    if signal.SIG_IGN in before.values():
        _default_signals()
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


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


# ---------------------------------------------------------------------------------------------
# Token ids: checked before any cast, in forward, generate and decode_step; NaN under jit.

BIG_IDS = [
    [[1, 2**40]],
    np.array([[1, 2**40]], np.int64),
    np.array([[1, 2**32]], np.uint64),
    [[1, 2**63]],  # numpy makes this float64
    [[1, 2**70]],  # and this object
    np.array([[1, -(2**40)]], np.int64),
]


@pytest.mark.parametrize("ids", BIG_IDS, ids=range(len(BIG_IDS)))
def test_ids_beyond_int32_are_refused_not_wrapped(ids, tiny):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.forward(tiny, ids)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.generate(tiny, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.prefill(tiny, ids)


@pytest.mark.parametrize("bad", ["vocab", "-1", "2**40"])
def test_decode_step_checks_its_token(bad, tiny):
    vocab = tiny.config.padded_vocab_size
    value = {"vocab": vocab, "-1": -1, "2**40": 2**40}[bad]
    _, cache = lmj.prefill(tiny, [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.decode_step(tiny, cache, np.array([3, value], np.int64), donate=False)
    logits, _ = lmj.decode_step(tiny, cache, np.array([3, vocab - 1]), donate=False)
    assert np.isfinite(np.asarray(logits)).all()


def test_out_of_range_ids_under_jit_are_nan_and_checkify_reports_them(tiny):
    from jax.experimental import checkify

    vocab = tiny.config.padded_vocab_size
    _, cache = lmj.prefill(tiny, [[1, 2, 3]] * 3)
    step = jax.jit(lambda p, c, t: lmj.decode_step(p, c, t, donate=False)[0])
    logits = np.asarray(step(tiny, cache, np.array([5, vocab, -1], np.int32)))
    assert np.isfinite(logits[0]).all()
    assert np.isnan(logits[1]).all() and np.isnan(logits[2]).all()  # never another id's row
    checked = jax.jit(checkify.checkify(step))
    err, _ = checked(tiny, cache, np.array([5, -1, 7], np.int32))
    with pytest.raises(checkify.JaxRuntimeError, match="token ids must be in"):
        err.throw()
    err, _ = checked(tiny, cache, np.array([5, 6, 7], np.int32))
    err.throw()  # in range: no error
    fwd = jax.jit(lambda p, t: lmj.forward(p, t))
    out = np.asarray(fwd(tiny, np.array([[1, 2, 3], [1, -1, 3]], np.int32)))
    assert np.isfinite(out[0]).all()
    assert np.isnan(out[1, 1:]).all()  # from the bad id on (a chunked scan may reach earlier)


# ---------------------------------------------------------------------------------------------
# Calibration files: every array's shape, dtype and finiteness, and the header, checked on load.

def _rewrite_npz(src: Path, dst: Path, edit) -> Path:
    """Copies a calibration .npz, letting `edit(header: dict, arrays: dict)` change it."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    header_out = edit(header, arrays)
    text = header_out if isinstance(header_out, (str, np.ndarray)) else json.dumps(header)
    np.savez(dst, header=np.asarray(text), **arrays)
    return dst


@pytest.fixture(scope="module")
def cal_files(tiny, tmp_path_factory):
    """storage -> (params, path of a calibration of `tiny` saved with that storage)."""
    from longmamba_jax.calibration import calibrate
    from longmamba_jax.calibration.record import layer_A, record_deltas

    root = tmp_path_factory.mktemp("cal")
    stream = np.random.default_rng(0).integers(0, tiny.config.vocab_size, 300)
    cal = calibrate(tiny, stream, train_len=16, num_windows=4, backend="associative",
                    progress=False)
    cal.save(root / "exact.npz")
    deltas = record_deltas(tiny, stream, train_len=16, num_windows=4, backend="associative",
                           progress=False)
    grid = lmj.Calibration.from_deltas(deltas, layer_A(tiny), train_len=16, storage="grid",
                                       fingerprint=tiny.config.fingerprint)
    grid.save(root / "grid.npz")
    return {"exact": root / "exact.npz", "grid": root / "grid.npz"}


def _tile(name, n):
    def edit(header, arrays):
        arrays[name] = np.resize(arrays[name], (n,))
    return edit


def _set_array(name, fn):
    def edit(header, arrays):
        arrays[name] = fn(arrays[name])
    return edit


def _set_header(key, value):
    def edit(header, arrays):
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
    return edit


CAL_CASES = {
    # defect: a decay_fraction of 40 entries where 16 belong loaded and changed the logits
    "decay_fraction-too-long": ("exact", _tile("decay_fraction", 40), "decay_fraction"),
    "decay-too-short": ("exact", _tile("decay", 3), "decay"),
    "theta_asym-nan": ("grid", _set_array("theta_asym", lambda a: np.where(
        np.arange(a.size) == 1, np.nan, a).astype(a.dtype)), "theta_asym"),
    "decay_fraction-int": ("exact", _set_array("decay_fraction",
                                               lambda a: (a * 100).astype(np.int64)),
                           "decay_fraction"),
    "decay-inf": ("exact", _set_array("decay", lambda a: a + np.inf), "decay"),
    "curves-wrong-shape": ("exact", _set_array("curves_1", lambda a: a[:, :, :-1]), "curves_1"),
    "curves-negative": ("exact", _set_array("curves_0", lambda a: -a - 1), "curves_0"),
    "window_decay-windows": ("exact", _set_array("window_decay_0", lambda a: a[:2]),
                             "window_decay_0"),
    "grid_s-not-increasing": ("grid", _set_array("grid_s", lambda a: a[::-1].copy()), "grid_s"),
    "grid_s-float": ("grid", _set_array("grid_s", lambda a: a.astype(np.float64)), "grid_s"),
    "theta_codes-shape": ("grid", _set_array("theta_codes", lambda a: a[:, :-1]), "theta_codes"),
    "extra-array": ("grid", lambda h, a: a.update(junk=np.zeros(3)), "junk"),
    "header-not-json": ("exact", lambda h, a: "{oops", "header"),
    "header-a-number": ("exact", lambda h, a: "17", "header"),
    "header-not-text": ("exact", lambda h, a: np.arange(3), "header"),
    "n_layers-string": ("exact", _set_header("n_layers", "2"), "n_layers"),
    "channels-short": ("exact", _set_header("channels", [4]), "channels"),
    "train_len-missing": ("grid", _set_header("train_len", KeyError), "train_len"),
    # a valid-looking train_len that the grid's lengths and clamp_k contradict
    "train_len-changed-grid": ("grid", _set_header("train_len", 1), "grid_s"),
    "clamp_k-above-train_len": ("exact", _set_header("clamp_k", 10**6), "clamp_k"),
    "aggregate-unknown": ("grid", _set_header("aggregate", "median"), "aggregate"),
    "num_windows-zero": ("exact", _set_header("num_windows", 0), "num_windows"),
    "weights_digest-int": ("exact", _set_header("weights_digest", 5), "weights_digest"),
}


@pytest.mark.parametrize("case", sorted(CAL_CASES))
def test_bad_calibration_file_is_one_error_naming_it(case, cal_files, tmp_path):
    storage, edit, needle = CAL_CASES[case]
    bad = _rewrite_npz(cal_files[storage], tmp_path / "bad.npz", edit)
    with pytest.raises(ValueError) as info:
        lmj.Calibration.load(bad)
    msg = str(info.value)
    assert str(bad) in msg and needle in msg, msg
    assert type(info.value).__module__.startswith("longmamba_jax") \
        or type(info.value) is ValueError


@pytest.mark.parametrize("storage", ["exact", "grid"])
def test_good_calibration_files_still_load(storage, cal_files, tmp_path):
    copy = _rewrite_npz(cal_files[storage], tmp_path / "same.npz", lambda h, a: None)
    back = lmj.Calibration.load(copy)
    ref = lmj.Calibration.load(cal_files[storage])
    for a, b in zip(back.thresholds(40), ref.thresholds(40), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bundled_demo_calibration_loads():
    from longmamba_jax.demo import DEMO_DIR

    cal = lmj.Calibration.load(DEMO_DIR / "calibration.npz")
    assert cal.n_layers >= 1 and cal.thresholds(cal.train_len + 1)


# ---------------------------------------------------------------------------------------------
# --out: one writer at a time; nothing a user made is ever deleted.

def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_two_conversions_to_one_out_exactly_one_succeeds(model_dir, tmp_path, capsys):
    from longmamba_jax.checkpoints.converted import atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as first:  # a conversion in progress holds --out
        (first / "longmamba_config.json").write_text("{}")
        code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)
        assert code == 1, stderr
        assert "another" in stderr and str(out) in stderr
        assert not out.exists()
    assert _snapshot(out) == {"longmamba_config.json": b"{}"}  # the first one's output
    assert _siblings(out) == []
    # --force does not let a second writer in either.
    with atomic_directory(out, force=True):
        code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify", "--force"],
                                   capsys)
        assert code == 1 and "another" in stderr
    assert _siblings(out) == []


def _during_save(monkeypatch, action):
    """Runs `action()` right after the converter wrote its Orbax checkpoint."""
    from longmamba_jax.checkpoints import converted

    original = converted.save_converted

    def save_then_act(*args, **kwargs):
        result = original(*args, **kwargs)
        action()
        return result

    monkeypatch.setattr(converted, "save_converted", save_then_act)


def _user_dir(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("precious")


@pytest.mark.parametrize("force", [False, True])
def test_directory_appearing_at_out_during_conversion_is_kept(force, model_dir, tmp_path,
                                                               capsys, monkeypatch):
    out = tmp_path / "out"
    _during_save(monkeypatch, lambda: _user_dir(out))
    argv = ["--hf", model_dir, "--out", out, "--no-verify"] + (["--force"] if force else [])
    code, _, stderr = _convert(argv, capsys)
    assert code == 1 and str(out) in stderr and "left untouched" in stderr, stderr
    assert _snapshot(out) == {"notes.txt": b"precious"}
    assert _siblings(out) == []


@pytest.mark.parametrize("change", ["replaced", "added-to"])
def test_force_replaces_only_a_previous_conversion_even_if_it_changes(
        change, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)[0] == 0

    def user_edit():
        if change == "replaced":
            shutil.rmtree(out)
            _user_dir(out)
        else:
            (out / "notes.txt").write_text("precious")

    _during_save(monkeypatch, user_edit)
    code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify", "--force"],
                               capsys)
    assert code == 1 and "left untouched" in stderr, stderr
    assert _snapshot(out)["notes.txt"] == b"precious"
    assert _siblings(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rerun_removes_temp_dirs_of_dead_conversions_only(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{dead}-ab_cd123"
    mine = tmp_path / f".out.tmp-{live}-ab_cd123"
    foreign = [tmp_path / ".out.tmp-notapid", tmp_path / f".other.tmp-{dead}-ab_cd123",
               tmp_path / f".out.tmp-{dead}-toolong123"]
    for d in [stale, mine, *foreign]:
        (d / "params").mkdir(parents=True)
        (d / "params" / "x").write_text("x")
    code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)
    assert code == 0, stderr
    assert not stale.exists()
    assert mine.exists() and all(d.exists() for d in foreign)


def test_previous_output_moved_aside_by_a_killed_run_is_restored(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)[0] == 0
    before = _snapshot(out)
    aside = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    out.rename(aside)  # as if killed between the two renames of a --force commit
    code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)
    assert code == 1 and "already exists" in stderr
    assert _snapshot(out) == before and _siblings(out) == []


# ---------------------------------------------------------------------------------------------
# Signals. In-process: `main` signals itself as each phase's work starts (the handler only
# records it; the phase's Orbax / jax work then runs with the signal pending). As a real
# `python -m convert`: the defect's case during verification, and a second signal.

PHASES = [("start", signal.SIGINT), ("hash", signal.SIGTERM), ("load", signal.SIGINT),
          ("save", signal.SIGTERM), ("saved", signal.SIGHUP), ("commit", signal.SIGINT)]


@pytest.mark.parametrize("phase,sig", PHASES, ids=[f"{p}-{s.name}" for p, s in PHASES])
def test_signal_in_each_phase_exits_cleanly_and_removes_the_temp_dir(
        phase, sig, model_dir, tmp_path, capsys, monkeypatch):
    from longmamba_convert.interrupts import SignalGuard

    original = SignalGuard.phase

    def phase_then_signal(self, name):
        original(self, name)
        if name == phase:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(SignalGuard, "phase", phase_then_signal)
    out = tmp_path / "out"
    code, _, stderr = _convert(["--hf", model_dir, "--out", out, "--no-verify"], capsys)
    assert code == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert _siblings(out) == []
    if phase == "commit":  # the renames finish; the signal is reported after them
        assert "after the output was complete" in stderr
        lmj.load(out)
    else:
        assert "output not written" in stderr and not out.exists()


def _start(src, out, *extra, pause=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMJ_")}
    env.update(TQDM_DISABLE="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    if pause:
        env["LMJ_CONVERT_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-m", "convert", "--hf", str(src), "--out", str(out), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc, needle: str, timeout: float = 120.0, stream: str = "stdout") -> str:
    """Reads the child's stdout (or stderr) until `needle` appears (fails on exit or timeout)."""
    deadline = time.monotonic() + timeout
    fd = getattr(proc, stream).fileno()  # unbuffered reads: select() must see every byte
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if needle.encode() in seen:
                return seen.decode()
    proc.kill()
    pytest.fail(f"no {needle!r} from the converter: {seen.decode()} {proc.stderr.read()}")


def _finish(proc) -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the converter did not stop after the signal")
    return proc.returncode, stderr.decode()


def _clean_exit(code, stderr, want):
    assert code == want, stderr
    assert "Fatal Python error" not in stderr and "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr


def test_ctrl_c_after_writing_during_verification(model_dir, tmp_path):
    """The defect's case: SIGINT just after "wrote Orbax", while jax collects garbage and torch
    is imported for the verification (it was swallowed by a jax GC callback: exit 0)."""
    out = tmp_path / "out"
    proc = _start(model_dir, out)
    _wait_for(proc, "wrote Orbax")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code, stderr = _finish(proc)
    _clean_exit(code, stderr, 130)
    assert not out.exists() and _siblings(out) == []


def test_second_signal_stops_at_once(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(model_dir, out, "--no-verify", pause="saved:hold")
    _wait_for(proc, "paused at saved")
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "stopping at the next safe point", stream="stderr")
    proc.send_signal(signal.SIGTERM)  # while it still holds at the pause
    code, stderr = _finish(proc)
    _clean_exit(code, stderr, 143)
    assert "SIGTERM again: stopped" in stderr
    assert not out.exists() and _siblings(out) == []


# ---------------------------------------------------------------------------------------------
# Weights: floats only, finite only; shard files inside the checkpoint folder.

def _edit_tensor(directory: Path, key: str, fn) -> None:
    from safetensors.numpy import load_file, save_file

    state = dict(load_file(directory / "model.safetensors"))
    state[key] = fn(state[key])
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


BAD_VALUES = {
    "int32": lambda a: np.ones(a.shape, np.int32),
    "bool": lambda a: np.ones(a.shape, bool),
    "nan": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype),
    "inf": lambda a: (a - np.inf).astype(a.dtype),
}


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_non_float_or_non_finite_weights_are_refused(kind, model_dir, tmp_path):
    src = _copy(model_dir, tmp_path / "src")
    key = "backbone.layers.1.mixer.dt_bias"
    _edit_tensor(src, key, BAD_VALUES[kind])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: key '{key}'") as info:
        lmj.load(src)
    assert ("floating point" if kind in ("int32", "bool") else "NaN or inf") in str(info.value)


def test_converted_checkpoint_checks_checksums_and_finiteness(tiny, tmp_path):
    from longmamba_jax.checkpoints.converted import save_converted

    d = save_converted(tiny, tmp_path / "c", manifest={})
    back = lmj.load(d)
    for a, b in zip(jax.tree.leaves(back.weights), jax.tree.leaves(tiny.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert lmj.load(d, dtype=jax.numpy.bfloat16).dtype == jax.numpy.bfloat16
    config_file = d / "longmamba_config.json"
    raw = json.loads(config_file.read_text())
    raw["checksums"]["layers/mixer/D"] ^= 1 << 7
    config_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="layers/mixer/D does not match its checksum"):
        lmj.load(d)
    del raw["checksums"]  # as written before checksums were recorded: still loads
    config_file.write_text(json.dumps(raw))
    lmj.load(d)
    weights = jax.tree.map(lambda a: a, tiny.weights)
    weights["norm_f"]["weight"] = weights["norm_f"]["weight"].at[3].set(np.inf)
    nan = save_converted(lmj.Params(weights, tiny.config), tmp_path / "nan", manifest={})
    with pytest.raises(CheckpointError, match="params: parameter norm_f/weight holds NaN or inf"):
        lmj.load(nan)


def _sharded(model_dir: Path, root: Path, shard_name: str) -> Path:
    """model_dir as a one-shard checkpoint whose index names `shard_name`."""
    from safetensors.numpy import load_file

    src = root / "src"
    src.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", src / "config.json")
    keys = load_file(model_dir / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard_name for k in keys}}))
    return src


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink-out"])
def test_shard_index_cannot_reach_outside_the_checkpoint(where, model_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(model_dir / "model.safetensors", outside)
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside),
            "symlink-out": "model-00001-of-00001.safetensors"}[where]
    src = _sharded(model_dir, tmp_path, name)
    if where == "symlink-out":
        (src / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*outside the "
                                              r"checkpoint directory"):
        lmj.load(src)


def test_hub_cache_symlinks_into_blobs_are_allowed(model_dir, tmp_path):
    repo = tmp_path / "models--owner--name"
    (repo / "blobs").mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", repo / "blobs" / "0123abcd")
    shutil.copytree(_sharded(model_dir, tmp_path / "x", "model-00001-of-00001.safetensors"),
                    repo / "snapshots" / "rev")
    (repo / "snapshots" / "rev" / "model-00001-of-00001.safetensors").symlink_to(
        Path("..") / ".." / "blobs" / "0123abcd")
    lmj.load(repo / "snapshots" / "rev")


# ---------------------------------------------------------------------------------------------
# Calibrations: matched to the weights they were measured on; the token stream checked first.

@pytest.fixture(scope="module")
def tiny_cal(tiny):
    from longmamba_jax.calibration import calibrate

    stream = np.random.default_rng(0).integers(0, tiny.config.vocab_size, 300)
    return calibrate(tiny, stream, train_len=16, num_windows=4, backend="associative",
                     progress=False)  # as in cal_files: the same compiled program


def test_calibration_of_other_weights_with_the_same_shapes_is_refused(tiny, tiny_cal, tmp_path):
    from longmamba_jax.calibration.record import weights_digest

    assert tiny_cal.weights_digest == weights_digest(tiny)
    ids = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (1, 40))
    lm = lmj.LongMamba(tiny_cal, channel_threshold=0)
    lm.check_params(tiny)
    assert weights_digest(tiny.astype(jax.numpy.bfloat16)) == tiny_cal.weights_digest
    other = lmj.Params(jax.tree.map(lambda a: a * 1.01, tiny.weights), tiny.config)
    with pytest.raises(ValueError, match="does not match the model: weights digest"):
        lmj.forward(other, ids, method=lm)
    with pytest.raises(ValueError, match="weights digest"):
        lmj.generate(other, ids, max_new_tokens=2, method=lm)
    lmj.LongMamba(tiny_cal, check_weights=False).check_params(other)
    path = tmp_path / "cal.npz"
    tiny_cal.save(path)
    assert lmj.Calibration.load(path).weights_digest == tiny_cal.weights_digest
    with pytest.raises(ValueError, match=r"cal\.npz: .*weights digest"):
        lmj.Calibration.load(path, expect={"weights_digest": weights_digest(other)})
    # A calibration without a digest (written before digests were recorded) is not checked.
    old = _rewrite_npz(path, tmp_path / "old.npz", _set_header("weights_digest", KeyError))
    assert lmj.Calibration.load(old).weights_digest is None
    lmj.LongMamba(lmj.Calibration.load(old)).check_params(other)


BAD_STREAMS = {
    "id-beyond-vocab": (lambda v: np.full(100, v), r"token ids must be in \[0, "),
    "negative-id": (lambda v: np.full(100, -1), r"token ids must be in \[0, "),
    "float": (lambda v: np.linspace(0, 5, 100), "integer"),
    "bool": (lambda v: np.ones(100, bool), "integer"),
    "empty-batch": (lambda v: np.zeros((0, 4), np.int64), "1-D"),
    "batch-of-two": (lambda v: np.zeros((2, 50), np.int64), "1-D"),
    "too-short": (lambda v: np.zeros(10, np.int64), "fewer than train_len"),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_calibrate_checks_the_token_stream_first(case, tiny):
    from longmamba_jax.calibration import calibrate, record_deltas

    make, needle = BAD_STREAMS[case]
    stream = make(tiny.config.padded_vocab_size)
    for fn in (calibrate, record_deltas):
        with pytest.raises(ValueError, match=needle):
            fn(tiny, stream, train_len=16, num_windows=2, progress=False)


def test_signal_guard_records_then_raises_at_safe_points():
    from longmamba_convert.interrupts import Interrupted, SignalGuard

    before = signal.getsignal(signal.SIGTERM)
    with SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded only: the next line runs
        assert guard.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as info:
            guard.check()
        assert info.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) is before
    with SignalGuard() as guard, pytest.raises(Interrupted):
        with guard.interruptible():  # a hub download: raised at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            pytest.fail("not interrupted")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with SignalGuard():  # an ignored signal (nohup) stays ignored
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("prompts", [[[1, 2, 3], [4, 2**40]], [[4, 2**63]], [1, 2**40]],
                         ids=["ragged", "beyond-int64", "single"])
def test_prompt_lists_are_range_checked_before_padding(prompts, tiny):
    """generate pads a list of prompts into one array: that must not wrap 2**40 to 0."""
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.generate(tiny, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        lmj.generate(tiny, prompts, max_new_tokens=2, pad_to_multiple_of=4)


def test_bin_with_a_flipped_bit_in_a_tensor_is_refused(tiny, tmp_path):
    """torch.load does not check a zip entry's CRC-32: a flipped bit in a tensor's bytes loaded
    as another weight. The reader checks every entry first."""
    pytest.importorskip("torch", reason="reading .bin checkpoints needs torch")
    import zipfile

    src = export_torch(tiny, tmp_path / "m", weights_format="bin")
    path = src / "pytorch_model.bin"
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    head = info.header_offset  # local file header: 30 bytes, then the name and extra field
    name_len = int.from_bytes(data[head + 26:head + 28], "little")
    extra_len = int.from_bytes(data[head + 28:head + 30], "little")
    data[head + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: entry .* CRC-32"):
        lmj.load(src)
