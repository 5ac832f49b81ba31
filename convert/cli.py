"""`python -m convert` / `longmamba-convert`: a torch Mamba checkpoint -> our Orbax format.

    python -m convert --hf state-spaces/mamba2-1.3b --out ckpt/mamba2-1.3b
    python -m convert --hf ./my-checkpoint --out ckpt/mine --dtype bfloat16 --force

Steps: resolve the source (a local directory, or a hub id through huggingface_hub: its cache,
HF_HUB_OFFLINE and HF_TOKEN are respected), hash the input files, stream the tensors into
parameters (strict key table, progress bar), write the Orbax checkpoint + config + manifest into
a temporary directory beside --out, load that back and verify it against transformers' torch
model, and only then rename it to --out. Any failure leaves --out as it was.

Exit status: 0 on success, 1 on a conversion error (one line on stderr naming the file and key),
2 on bad arguments, 128 + the signal number on SIGINT (130), SIGTERM (143) or SIGHUP (129)
(`interrupts.py`; docs/reliability.md).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import sys
import time
from pathlib import Path

from longmamba_convert.interrupts import Interrupted, SignalGuard

DTYPES = ("auto", "float32", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a PyTorch Mamba / Mamba2 checkpoint (mamba_ssm native or "
                    "transformers layout) into a longmamba-jax Orbax checkpoint.",
    )
    p.add_argument("--hf", required=True, metavar="ID_OR_DIR",
                   help="hub id (e.g. state-spaces/mamba2-1.3b) or local checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="parameter dtype: auto keeps fp32 or bf16 as stored (fp16 or mixed "
                        "become fp32); float32; bfloat16 (cast)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (only after the new output is complete)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the forward comparison against transformers' torch model")
    p.add_argument("--verify-layers", type=int, default=None, metavar="N",
                   help="verify on the first N layers only (for very large models; default: "
                        "all)")
    return p


def sha256(path: Path, chunk: int = 1 << 23, check=None) -> str:
    """Hex sha256 of a file, read in chunks (`check()` called between them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if check is not None:
                check()
    return h.hexdigest()


def _input_files(directory: Path) -> list[Path]:
    from longmamba_jax.checkpoints.files import SAFETENSORS_INDEX, weight_files
    from longmamba_jax.checkpoints.torch_format import MISTRAL_CONFIG, MISTRAL_WEIGHTS, config_file

    files = [config_file(directory)]
    if files[0].name == MISTRAL_CONFIG:  # Codestral Mamba's own release
        return files + [directory / MISTRAL_WEIGHTS]
    if (directory / SAFETENSORS_INDEX).exists():
        files.append(directory / SAFETENSORS_INDEX)
    return files + weight_files(directory)


_T0 = time.monotonic()


def _say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def convert(args: argparse.Namespace, guard: SignalGuard | None = None) -> Path:
    """Runs one conversion; raises on any failure (the output is then left untouched).

    `guard` (a `SignalGuard`) is checked at every safe point; `Interrupted` ends the run there.
    """
    from longmamba_jax.checkpoints.atomic import atomic_directory, lock_path

    guard = guard if guard is not None else SignalGuard()
    out = Path(args.out)
    guard.phase("start")
    # The output's lock is held from here to the end: a second conversion to the same --out
    # is refused at once, before any expensive work.
    with atomic_directory(out, force=args.force, on_commit=guard.commit) as tmp:
        guard.remove_on_abort(tmp, lock_path(out))
        directory, manifest, params = _read_source(args, guard)
        _write_and_verify(args, guard, tmp, directory, manifest, params)
    _say(f"done: {out}")
    guard.check()  # a signal during the final renames: reported, the output is complete
    return out


def _read_source(args, guard: SignalGuard):
    """Resolves, hashes and reads the source: (directory, manifest, Params)."""
    import jax.numpy as jnp

    import longmamba_jax
    from longmamba_jax.checkpoints.source import resolve_source
    from longmamba_jax.checkpoints.torch_format import load_torch_checkpoint

    with guard.interruptible():  # a hub download can take minutes
        directory = resolve_source(args.hf, revision=args.revision)
    is_local = Path(str(args.hf)).expanduser().is_dir()
    _say(f"source: {directory}")
    guard.phase("hash")
    files = _input_files(directory)
    hashes = {}
    for f in files:
        hashes[f.name] = {"sha256": sha256(f, check=guard.check), "bytes": f.stat().st_size}
    _say(f"hashed {len(files)} input files")
    guard.phase("load")
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    params, info = load_torch_checkpoint(directory, dtype=dtype, progress=True,
                                         on_tensor=guard.check)
    if dtype is None and params.dtype not in (jnp.float32, jnp.bfloat16):
        params = params.astype(jnp.float32)  # fp16: our precision policy is fp32 / bf16
    config = params.config
    _say(f"loaded {config.arch} ({info['schema']} layout): d_model={config.d_model} "
         f"n_layer={config.n_layer} vocab={config.vocab_size} (padded "
         f"{config.padded_vocab_size}) tie_embeddings={config.tie_embeddings} "
         f"dtype={params.dtype}")
    manifest = {
        "source": str(args.hf),
        "source_kind": "local" if is_local else "hub",
        "source_path": str(Path(directory).absolute()),
        "revision": args.revision,
        "resolved_commit": None if is_local else Path(directory).name,
        "schema": info["schema"],
        "input_files": hashes,
        "requested_dtype": args.dtype,
        "library_version": longmamba_jax.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    return directory, manifest, params


def _write_and_verify(args, guard: SignalGuard, tmp: Path, directory, manifest, params):
    """Writes the Orbax checkpoint into `tmp`, loads it back and verifies it."""
    from longmamba_jax.checkpoints import converted

    guard.phase("save")
    converted.save_converted(params, tmp, manifest=manifest)
    del params
    gc.collect()
    guard.check()
    _say(f"wrote Orbax checkpoint ({tmp.name})")
    guard.phase("saved")
    manifest = {**manifest, **_read_manifest(tmp)}
    if args.verify:
        from longmamba_convert.verify import VerificationError, torch_unavailable, truncate
        from longmamba_convert.verify import verify as run_verify

        guard.check()
        reason = torch_unavailable()
        if reason is not None:
            _say(f"verification skipped: {reason} (pip install torch transformers)")
            manifest["verification"] = {"skipped": reason}
        else:
            _say("loading the written checkpoint back for verification")
            guard.phase("verify")
            written = converted.load_converted(tmp)  # verify what was written, not memory
            guard.check()
            if args.verify_layers is not None:
                written = truncate(written, args.verify_layers)
            result = run_verify(written, check=guard.check)
            del written
            guard.check()
            _say(f"verification against transformers ({result['dtype']}, "
                 f"{result['n_layer']} layers, tokens {result['tokens']}): max relative error "
                 f"{result['max_rel_err']:.3g}, relative norm error "
                 f"{result['rel_norm_err']:.3g} (tolerance {result['tolerance']:g})")
            if not result["passed"]:
                raise VerificationError(
                    f"{directory}: verification failed: relative norm error "
                    f"{result['rel_norm_err']:.3g} exceeds {result['tolerance']:g} (max "
                    f"relative error {result['max_rel_err']:.3g}); output not written"
                )
            manifest["verification"] = result
    else:
        manifest["verification"] = {"skipped": "--no-verify"}
    converted.write_manifest(tmp, manifest)
    guard.check()


def _read_manifest(directory: Path) -> dict:
    import json

    from longmamba_jax.checkpoints.converted import MANIFEST

    return json.loads((directory / MANIFEST).read_text())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    global _T0
    _T0 = time.monotonic()
    args = _parser().parse_args(argv)
    if args.verify_layers is not None and args.verify_layers < 1:
        print("error: --verify-layers must be >= 1", file=sys.stderr)
        return 2
    # The handlers go in before the heavy imports, so a signal at any point is only recorded.
    with SignalGuard() as guard:
        try:
            from longmamba_convert.verify import VerificationError
            from longmamba_jax.checkpoints.files import CheckpointError
            from longmamba_jax.config import ConfigError

            guard.check()
            try:
                convert(args, guard)
            except (CheckpointError, ConfigError, VerificationError, OSError) as exc:
                guard.check()  # interrupted while failing: the signal decides the status
                _close_progress_bars()
                print(f"error: {exc}", file=sys.stderr)
                return 1
        except (Interrupted, KeyboardInterrupt) as exc:
            _close_progress_bars()
            status = exc.exit_status if isinstance(exc, Interrupted) else 130
            name = str(exc) or "SIGINT"
            if guard.committed:
                print(f"interrupted ({name}) after the output was complete: {args.out} holds "
                      "the finished conversion", file=sys.stderr)
            else:
                print(f"interrupted ({name}); output not written", file=sys.stderr)
            return status
    return 0


def _close_progress_bars() -> None:
    """Finishes a progress bar an error interrupted, so the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
