"""Fuzzing the checkpoint and calibration readers with seeded random damage.

Each case copies a small valid input, damages it (a truncation, flipped bits, or a field set to
a value of the wrong type or range) and reads it. Every case must end in the library's own
error (`CheckpointError`, `ConfigError`, `CalibrationError`: ValueError subclasses) naming the
damaged checkpoint or file, or, when the damage changed nothing that matters (a flipped bit in
a zip timestamp, a file the reader does not read), load exactly the original values. Never
another exception, a crash, a hang (a watchdog ends the run) or a file written.

What is damaged per reader:
- safetensors: truncations anywhere; bits and fields of the header and its length. The tensor
  bytes themselves are not flipped: the format has no checksum, so a flipped weight bit is a
  different, valid weight (the converter's manifest keeps the inputs' sha256).
- shard index: the index (bits, truncation, fields: names outside the folder, missing shards,
  wrong types) and the shards (truncation, header bits, a symlink out of the folder).
- `.bin`: truncations; bits of everything but the tensor storages (zip headers, the pickle, the
  central directory), for the same reason as safetensors; keys, dtypes and shapes changed.
- calibration `.npz`: anything (the zip's CRC32 covers every member); header fields; arrays
  replaced, dropped or added.
- converted directory: any file truncated, flipped or deleted (the checksums in
  longmamba_config.json cover the weights); fields of longmamba_config.json. A flip that makes
  longmamba_config.json another valid config is an edit the reader cannot tell from a real one:
  such a case must load the original weights with the edited config.

The number of cases is `LMJ_FUZZ_CASES` (default 300, spread over the five readers);
`LMJ_FUZZ_VERBOSE=1` prints the cases that loaded (run pytest with -s to see them).
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.calibration import Calibration, CalibrationError
from longmamba_jax.checkpoints import CheckpointError
from longmamba_jax.checkpoints.export import export_torch
from longmamba_jax.checkpoints.torch_format import expected_shapes
from longmamba_jax.config import ConfigError

CASES = int(os.environ.get("LMJ_FUZZ_CASES", "300"))
READERS = ("safetensors", "shards", "bin", "calibration", "converted")
HANG_SECONDS = 120
BAD_VALUES = [None, True, -1, 0, 1, 2**31, 2**64, 1.5, float("nan"), "x", "", [], [1, -2], {},
              {"a": 1}]
OWN_ERRORS = (CheckpointError, ConfigError, CalibrationError)


def _seeds(reader: str) -> range:
    return range(READERS.index(reader), CASES, len(READERS))


# ---------------------------------------------------------------------------------------------
# The valid inputs.

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-base")
    config = lmj.Mamba2Config.tiny(n_layer=2, d_state=8, headdim=8)
    rng = np.random.default_rng(3)  # any finite values will do (nothing runs the model)
    weights: dict = {}
    for path, shape in expected_shapes(config).items():
        node = weights
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    params = lmj.Params(weights, config)
    ref = {k: np.asarray(v) for k, v in _leaves(params.weights)}
    st = export_torch(params, root / "safetensors")
    shards = root / "shards"
    _split_into_shards(st, shards)
    from longmamba_jax.checkpoints.converted import save_converted

    converted = save_converted(params, root / "converted", manifest={"source": "fuzz"})
    rng = np.random.default_rng(1)
    for storage in ("exact", "grid"):
        deltas = [rng.uniform(0, 2, (3, 16, 8)).astype(np.float32) for _ in range(2)]
        Calibration.from_deltas(deltas, [-np.exp(rng.normal(size=8)) for _ in range(2)],
                                train_len=16, storage=storage, fingerprint="fuzz",
                                weights_digest="0123456789abcdef" if storage == "exact" else None,
                                ).save(root / f"{storage}.npz")
    return {"params": params, "ref": ref, "safetensors": st, "shards": shards,
            "converted": converted, "calibrations": [root / "exact.npz", root / "grid.npz"],
            "root": root}


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield "/".join(prefix), tree


def _split_into_shards(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    names = {"model-00001-of-00002.safetensors": keys[::2],
             "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in names.items():
        save_file({k: state[k] for k in ks}, dst / name, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in names.items() for k in ks}}))


# ---------------------------------------------------------------------------------------------
# Damage.

def _truncate(path: Path, rng) -> str:
    data = path.read_bytes()
    cut = int(rng.integers(0, max(len(data), 1)))
    path.write_bytes(data[:cut])
    return f"truncate {path.name} at {cut}/{len(data)}"


def _flip(path: Path, rng, lo: int = 0, hi: int | None = None, positions=None) -> str:
    """Flips 1-4 random bits of bytes [lo, hi), or of the byte `positions` given."""
    data = bytearray(path.read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    if positions is None:
        positions = np.arange(lo, hi)
    if len(positions) == 0:
        return _truncate(path, rng)
    flips = []
    for _ in range(int(rng.integers(1, 5))):
        i = int(positions[int(rng.integers(0, len(positions)))])
        bit = int(rng.integers(0, 8))
        data[i] ^= 1 << bit
        flips.append(f"{i}.{bit}")
    path.write_bytes(bytes(data))
    return f"flip {path.name} bits {flips}"


def _bad_value(rng):
    return BAD_VALUES[int(rng.integers(0, len(BAD_VALUES)))]


def _st_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_write(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def _damage_safetensors(path: Path, rng) -> str:
    kind = int(rng.integers(0, 5))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if kind == 0:
        return _truncate(path, rng)
    if kind == 1:
        return _flip(path, rng, 0, 8 + n)
    if kind == 2:
        choices = [0, 1, n - 1, n + 1, len(data) - 8, len(data), 2**36, 2**60, 2**63,
                   int(rng.integers(0, 2**63))]
        new = choices[int(rng.integers(0, len(choices)))]
        path.write_bytes(new.to_bytes(8, "little") + data[8:])
        return f"header length {n} -> {new}"
    if kind == 3:
        path.write_bytes(data + bytes(int(rng.integers(1, 64))))
        return "append junk"
    header, body = _st_header(path)
    keys = sorted(k for k in header if k != "__metadata__")
    key = keys[int(rng.integers(0, len(keys)))]
    what = ["dtype", "shape", "data_offsets", "entry", "offset-value", "swap", "extra"][
        int(rng.integers(0, 7))]
    if what == "entry":
        header[key] = _bad_value(rng)
    elif what == "offset-value":
        i = int(rng.integers(0, 2))
        header[key]["data_offsets"][i] += int(rng.integers(-9, 10))
    elif what == "swap":  # two tensors of different sizes (same-size swaps are valid files)
        def size(k):
            return header[k]["data_offsets"][1] - header[k]["data_offsets"][0]

        others = [k for k in keys if size(k) != size(key)]
        other = others[int(rng.integers(0, len(others)))]
        header[key]["data_offsets"], header[other]["data_offsets"] = \
            header[other]["data_offsets"], header[key]["data_offsets"]
    elif what == "extra":
        header["backbone.layers.0.mixer.junk"] = {"dtype": "F32", "shape": [1],
                                                  "data_offsets": [0, 4]}
    elif rng.integers(0, 4) == 0:
        del header[key][what]
    else:
        header[key][what] = _bad_value(rng) if rng.integers(0, 2) else \
            (["F64", "I32", "BOOL", "F8_E4M3", "U64"][int(rng.integers(0, 5))]
             if what == "dtype" else [int(v) for v in rng.integers(-3, 70, 2)])
    _st_write(path, header, body)
    return f"field {what} of {key}"


def _damage_shards(directory: Path, rng) -> str:
    index = directory / "model.safetensors.index.json"
    shards = sorted(directory.glob("model-*.safetensors"))
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return _truncate(index, rng)
    if kind == 1:
        return _flip(index, rng)
    if kind == 2:
        return _damage_safetensors(shards[int(rng.integers(0, len(shards)))], rng)
    if kind == 3:
        outside = directory.parent / "outside.safetensors"
        shutil.copy(shards[0], outside)
        shards[0].unlink()
        shards[0].symlink_to(outside)
        return f"{shards[0].name} -> symlink outside"
    raw = json.loads(index.read_text())
    keys = sorted(raw["weight_map"])
    key = keys[int(rng.integers(0, len(keys)))]
    if kind == 4:
        names = ["../outside.safetensors", "/etc/hostname", "", "sub/../../x.safetensors",
                 "model-00003-of-00002.safetensors", shards[0].name, shards[1].name,
                 "config.json", ".", "model-00001-of-00002.safetensors/"]
        value = names[int(rng.integers(0, len(names)))] if rng.integers(0, 3) else \
            _bad_value(rng)
        raw["weight_map"][key] = value
        index.write_text(json.dumps(raw))
        return f"weight_map[{key}] = {value!r}"
    raw["weight_map"] = _bad_value(rng) if rng.integers(0, 2) else [raw["weight_map"]]
    index.write_text(json.dumps(raw))
    return f"weight_map = {raw['weight_map']!r}"[:80]


def _storage_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the tensor storages inside a torch zip (what a flip may not touch)."""
    data = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                off = info.header_offset
                name_len = int.from_bytes(data[off + 26:off + 28], "little")
                extra_len = int.from_bytes(data[off + 28:off + 30], "little")
                start = off + 30 + name_len + extra_len
                out.append((start, start + info.compress_size))
    return out


def _damage_bin(path: Path, rng) -> str:
    import torch

    kind = int(rng.integers(0, 4))
    if kind == 0:
        return _truncate(path, rng)
    if kind in (1, 2):
        keep = np.ones(path.stat().st_size, bool)
        for a, b in _storage_ranges(path):
            keep[a:b] = False
        return _flip(path, rng, positions=np.flatnonzero(keep))
    state = torch.load(path, weights_only=True)
    keys = sorted(state)
    key = keys[int(rng.integers(0, len(keys)))]
    what = ["rename", "drop", "int", "shape", "object", "nested"][int(rng.integers(0, 6))]
    if what == "rename":
        state[key + ".x"] = state.pop(key)
    elif what == "drop":
        del state[key]
    elif what == "int":
        state[key] = state[key].to(torch.int32)
    elif what == "shape":
        state[key] = state[key].reshape(-1)[:-1].clone()
    elif what == "object":
        state[key] = 3
    else:
        state = {"model": state}
    torch.save(state, path)
    return f"{what} {key}"


def _npz_arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _damage_calibration(path: Path, rng) -> str:
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return _truncate(path, rng)
    if kind == 1:
        return _flip(path, rng)
    arrays = _npz_arrays(path)
    header = json.loads(str(arrays.pop("header")))
    if kind == 2:
        key = sorted(header)[int(rng.integers(0, len(header)))]
        value = _bad_value(rng)
        header[key] = value
        desc = f"header {key} = {value!r}"
    elif kind == 3:
        name = sorted(arrays)[int(rng.integers(0, len(arrays)))]
        a = arrays[name]
        how = int(rng.integers(0, 5))
        arrays[name] = [a.astype(np.int64), a.reshape(-1)[:-1] if a.size else a[None],
                        np.where(a == a, np.nan, a) if a.dtype.kind == "f" else a.astype(float),
                        a[None], np.asarray("x")][how]
        desc = f"array {name} change {how}"
    else:
        name = sorted(arrays)[int(rng.integers(0, len(arrays)))]
        if rng.integers(0, 2):
            del arrays[name]
            desc = f"drop array {name}"
        else:
            arrays["curves_9"] = np.zeros((1, 1, 1))
            desc = "extra array"
    np.savez(path, header=np.asarray(json.dumps(header)), **arrays)
    return desc


def _damage_converted(directory: Path, rng) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    kind = int(rng.integers(0, 5))
    config = directory / "longmamba_config.json"
    if kind in (0, 1, 2):
        path = files[int(rng.integers(0, len(files)))]
        if kind == 0:
            return _truncate(path, rng)
        if kind == 1:
            return _flip(path, rng)
        path.unlink()
        return f"delete {path.relative_to(directory)}"
    raw = json.loads(config.read_text())
    if kind == 3:
        section = ["config", "checksums"][int(rng.integers(0, 2))]
        key = sorted(raw[section])[int(rng.integers(0, len(raw[section])))]
        raw[section][key] = _bad_value(rng)
        desc = f"{section}.{key} = {raw[section][key]!r}"
    else:
        key = sorted(raw)[int(rng.integers(0, len(raw)))]
        raw[key] = _bad_value(rng)
        desc = f"{key} = {raw[key]!r}"
    config.write_text(json.dumps(raw))
    return desc


# ---------------------------------------------------------------------------------------------
# Running the cases.

def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _same_weights(params, ref: dict) -> str | None:
    got = dict(_leaves(params.weights))
    if set(got) != set(ref):
        return f"parameters {sorted(set(got) ^ set(ref))}"
    for name, want in ref.items():
        have = np.asarray(got[name])
        if have.dtype != want.dtype or have.shape != want.shape or not np.array_equal(have, want):
            return f"parameter {name} differs"
    return None


def _same_calibration(cal, ref) -> str | None:
    if (cal.n_layers, cal.channels, cal.train_len) != (ref.n_layers, ref.channels,
                                                       ref.train_len):
        return "header differs"
    pairs = [(cal.decay_fraction, ref.decay_fraction), (cal.decay, ref.decay)]
    pairs += [(cal.thresholds(s), ref.thresholds(s)) for s in (17, 40, 1000)]
    for got, want in pairs:
        if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
            return "values differ"
    return None


def _run(reader: str, base, tmp_path, damage, load, compare, named) -> None:
    failures, refused = [], 0
    for seed in _seeds(reader):
        rng = np.random.default_rng(seed)
        case = tmp_path / f"case{seed}"
        case.mkdir()
        target = damage(case, rng)
        desc, path, mutated = target
        before = _listing(tmp_path)
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            result = load(path)
        except OWN_ERRORS as exc:
            refused += 1
            if named(path) not in str(exc):
                failures.append(f"seed {seed} ({desc}): error does not name the input: {exc}")
        except Exception as exc:  # noqa: BLE001 - exactly what this test is looking for
            failures.append(f"seed {seed} ({desc}): {type(exc).__name__}: {exc}"[:300])
        else:
            if os.environ.get("LMJ_FUZZ_VERBOSE"):
                print(f"  loaded: seed {seed} ({desc})")
            problem = compare(result, mutated)
            if problem:
                failures.append(f"seed {seed} ({desc}): loaded, but {problem}")
        finally:
            faulthandler.cancel_dump_traceback_later()
        if _listing(tmp_path) != before:
            failures.append(f"seed {seed} ({desc}): files written: "
                            f"{sorted(_listing(tmp_path) ^ before)}")
        shutil.rmtree(case)
    assert not failures, f"{len(failures)} of {len(_seeds(reader))} cases:\n" + \
        "\n".join(failures[:20])
    print(f"{reader}: {len(_seeds(reader))} cases, {refused} refused, the rest loaded unchanged")
    # Most damage must be caught (what loads must be unchanged, checked above); a reader that
    # refused next to nothing would mean the damage missed it.
    assert refused >= len(_seeds(reader)) // 2


def test_fuzz_safetensors(base, tmp_path):
    def damage(case, rng):
        d = shutil.copytree(base["safetensors"], case / "ckpt")
        return _damage_safetensors(d / "model.safetensors", rng), d, None

    _run("safetensors", base, tmp_path, damage, lmj.load,
         lambda p, _: _same_weights(p, base["ref"]), str)


def test_fuzz_shard_index(base, tmp_path):
    def damage(case, rng):
        d = shutil.copytree(base["shards"], case / "ckpt")
        return _damage_shards(d, rng), d, None

    _run("shards", base, tmp_path, damage, lmj.load,
         lambda p, _: _same_weights(p, base["ref"]), str)


def test_fuzz_torch_bin(base, tmp_path):
    pytest.importorskip("torch", reason="reading .bin checkpoints needs torch")
    import torch

    src = base["root"] / "bin"
    if not src.exists():
        export_torch(base["params"], src, weights_format="bin")
    assert torch.load(src / "pytorch_model.bin", weights_only=True)

    def damage(case, rng):
        d = shutil.copytree(src, case / "ckpt")
        return _damage_bin(d / "pytorch_model.bin", rng), d, None

    _run("bin", base, tmp_path, damage, lmj.load,
         lambda p, _: _same_weights(p, base["ref"]), str)


def test_fuzz_calibration_npz(base, tmp_path):
    refs = [Calibration.load(p) for p in base["calibrations"]]

    def damage(case, rng):
        which = int(rng.integers(0, 2))
        path = case / "cal.npz"
        shutil.copy(base["calibrations"][which], path)
        return _damage_calibration(path, rng), path, which

    _run("calibration", base, tmp_path, damage, Calibration.load,
         lambda cal, which: _same_calibration(cal, refs[which]), str)


def test_fuzz_converted_directory(base, tmp_path):
    config = base["params"].config

    def damage(case, rng):
        d = shutil.copytree(base["converted"], case / "ckpt")
        desc = _damage_converted(d, rng)
        edited = " longmamba_config.json" in desc or not desc.startswith(("truncate", "flip",
                                                                          "delete"))
        return desc, d, edited

    def compare(params, config_may_change):
        if params.config != config and not config_may_change:
            return "the config differs"
        return _same_weights(params, base["ref"])

    _run("converted", base, tmp_path, damage, lmj.load, compare, str)
