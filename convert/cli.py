"""`python -m convert` / `longmamba-convert`: a torch Mamba checkpoint -> our Orbax format.

    python -m convert --hf state-spaces/mamba2-1.3b --out ckpt/mamba2-1.3b
    python -m convert --hf ./my-checkpoint --out ckpt/mine --dtype bfloat16 --force

Steps: resolve the source (a local directory, or a hub id through huggingface_hub: its cache,
HF_HUB_OFFLINE and HF_TOKEN are respected), hash the input files, stream the tensors into
parameters (strict key table, progress bar), write the Orbax checkpoint + config + manifest into
a temporary directory beside --out, load that back and verify it against transformers' torch
model, and only then rename it to --out. Any failure leaves --out as it was.

Exit status: 0 on success, 1 on a conversion error (one line on stderr naming the file and key),
2 on bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import sys
import time
from pathlib import Path

from longmamba_jax.checkpoints.files import (
    SAFETENSORS_INDEX,
    CheckpointError,
    weight_files,
)
from longmamba_jax.checkpoints.source import resolve_source
from longmamba_jax.checkpoints.torch_format import (
    MISTRAL_CONFIG,
    MISTRAL_WEIGHTS,
    config_file,
    load_torch_checkpoint,
)
from longmamba_jax.config import ConfigError

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


def sha256(path: Path, chunk: int = 1 << 23) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _input_files(directory: Path) -> list[Path]:
    files = [config_file(directory)]
    if files[0].name == MISTRAL_CONFIG:  # Codestral Mamba's own release
        return files + [directory / MISTRAL_WEIGHTS]
    if (directory / SAFETENSORS_INDEX).exists():
        files.append(directory / SAFETENSORS_INDEX)
    return files + weight_files(directory)


_T0 = time.monotonic()


def _say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def convert(args: argparse.Namespace) -> Path:
    """Runs one conversion; raises on any failure (the output is then left untouched)."""
    import jax.numpy as jnp

    import longmamba_jax
    from longmamba_jax.checkpoints.converted import (
        atomic_directory,
        check_output_dir,
        load_converted,
        save_converted,
        write_manifest,
    )

    out = Path(args.out)
    check_output_dir(out, force=args.force)  # fail before any expensive work
    directory = resolve_source(args.hf, revision=args.revision)
    is_local = Path(str(args.hf)).expanduser().is_dir()
    _say(f"source: {directory}")
    files = _input_files(directory)
    hashes = {}
    for f in files:
        hashes[f.name] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    _say(f"hashed {len(files)} input files")
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    params, info = load_torch_checkpoint(directory, dtype=dtype, progress=True)
    if dtype is None and params.dtype not in (jnp.float32, jnp.bfloat16):
        params = params.astype(jnp.float32)  # fp16 checkpoints: our precision policy is fp32/bf16
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
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(out, force=args.force) as tmp:
        save_converted(params, tmp, manifest=manifest)
        del params
        gc.collect()
        _say(f"wrote Orbax checkpoint ({tmp.name})")
        manifest = {**manifest, **_read_manifest(tmp)}
        if args.verify:
            from longmamba_convert.verify import VerificationError, torch_unavailable, truncate
            from longmamba_convert.verify import verify as run_verify

            reason = torch_unavailable()
            if reason is not None:
                _say(f"verification skipped: {reason} (pip install torch transformers)")
                manifest["verification"] = {"skipped": reason}
            else:
                _say("loading the written checkpoint back for verification")
                written = load_converted(tmp)  # verify what was written, not what was in memory
                if args.verify_layers is not None:
                    written = truncate(written, args.verify_layers)
                result = run_verify(written)
                del written
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
        write_manifest(tmp, manifest)
    _say(f"done: {out}")
    return out


def _read_manifest(directory: Path) -> dict:
    import json

    from longmamba_jax.checkpoints.converted import MANIFEST

    return json.loads((directory / MANIFEST).read_text())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    from longmamba_convert.verify import VerificationError

    global _T0
    _T0 = time.monotonic()
    args = _parser().parse_args(argv)
    if args.verify_layers is not None and args.verify_layers < 1:
        print("error: --verify-layers must be >= 1", file=sys.stderr)
        return 2
    try:
        convert(args)
    except (CheckpointError, ConfigError, VerificationError, OSError) as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted; output not written", file=sys.stderr)
        return 130
    return 0


def _close_progress_bars() -> None:
    """Finishes a progress bar an error interrupted, so the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
