"""Wall time and peak memory of `python -m convert` on a checkpoint of mamba2-1.3b's shapes.

Writes a random-weight fp32 `pytorch_model.bin` in the mamba_ssm native layout with exactly
state-spaces/mamba2-1.3b's shapes (d_model 2048, 48 layers, vocab 50277 padded to 50288 by
pad_vocab_size_multiple 16, d_state 128, headdim 64, expand 2, ngroups 1, tied embeddings:
1.34 B parameters, ≈ 5.4 GB), then converts it in a subprocess (verification on unless told
otherwise) and reports the converter's wall time and peak resident memory (`ru_maxrss` of that
child from `os.wait4`, plus a sampled RSS timeline through psutil when it is installed).

    python evals/bench/convert_memory.py                     # full size, verification on
    python evals/bench/convert_memory.py --n-layer 4         # a quick smoke run

Prints a table and writes JSON (default `bench_convert_memory.json` in the current directory).
Temporary files are removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# state-spaces/mamba2-1.3b
D_MODEL, N_LAYER, VOCAB, PAD_MULTIPLE = 2048, 48, 50277, 16
D_STATE, HEADDIM, EXPAND, NGROUPS, D_CONV = 128, 64, 2, 1, 4


def native_config(n_layer: int) -> dict:
    return {
        "d_model": D_MODEL, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": VOCAB,
        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": PAD_MULTIPLE, "tie_embeddings": True,
    }


def write_checkpoint(directory: Path, n_layer: int, seed: int = 0) -> int:
    """Writes config.json + a random fp32 pytorch_model.bin; returns the .bin size in bytes.

    Every tensor is created once (torch.save serialises the dict as it is; nothing is copied),
    with magnitudes like a trained model's so the forward stays finite through 48 layers.
    """
    import torch

    torch.manual_seed(seed)
    d_inner = EXPAND * D_MODEL
    nheads = d_inner // HEADDIM
    conv_dim = d_inner + 2 * NGROUPS * D_STATE
    in_proj = 2 * d_inner + 2 * NGROUPS * D_STATE + nheads
    vocab = -(-VOCAB // PAD_MULTIPLE) * PAD_MULTIPLE

    def normal(*shape, std):
        return torch.empty(shape).normal_(0.0, std)

    state = {"backbone.embedding.weight": normal(vocab, D_MODEL, std=0.02)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        state[p + "mixer.dt_bias"] = torch.log(torch.expm1(torch.empty(nheads).uniform_(1e-3, 0.1)))
        state[p + "mixer.A_log"] = torch.log(torch.empty(nheads).uniform_(1.0, 16.0))
        state[p + "mixer.D"] = torch.ones(nheads)
        state[p + "mixer.in_proj.weight"] = normal(in_proj, D_MODEL, std=D_MODEL ** -0.5)
        state[p + "mixer.conv1d.weight"] = normal(conv_dim, 1, D_CONV, std=0.5)
        state[p + "mixer.conv1d.bias"] = normal(conv_dim, std=0.1)
        state[p + "mixer.norm.weight"] = torch.ones(d_inner)
        state[p + "mixer.out_proj.weight"] = normal(D_MODEL, d_inner,
                                                    std=d_inner ** -0.5 / math.sqrt(n_layer))
        state[p + "norm.weight"] = torch.ones(D_MODEL)
    state["backbone.norm_f.weight"] = torch.ones(D_MODEL)
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as mamba_ssm saves it
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(native_config(n_layer), indent=2))
    torch.save(state, directory / "pytorch_model.bin")
    del state
    gc.collect()
    return (directory / "pytorch_model.bin").stat().st_size


def _sample_rss(pid: int, samples: list, stop: threading.Event, every: float = 0.5) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        proc = psutil.Process(pid)
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - t0, 1), proc.memory_info().rss))
            stop.wait(every)
    except psutil.Error:  # the process ended
        return


def run_converter(src: Path, out: Path, extra: list[str]) -> dict:
    """Runs `python -m convert` from the repository root; its wall time, peak RSS, output."""
    cmd = [sys.executable, "-m", "convert", "--hf", str(src), "--out", str(out), *extra]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, samples, stop), daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "rss_timeline": samples[:: max(1, len(samples) // 200)],
        "output": output,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=N_LAYER, help="layers (48 = mamba2-1.3b)")
    ap.add_argument("--workdir", default=None, help="where to put the temporary files")
    ap.add_argument("--json", default="bench_convert_memory.json", help="result file")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    ap.add_argument("--convert-args", default="",
                    help="extra converter arguments, e.g. '--no-verify' or '--dtype bfloat16'")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        src, out = work / "mamba2-1.3b-random", work / "converted"
        t0 = time.monotonic()
        size = write_checkpoint(src, args.n_layer)
        write_s = time.monotonic() - t0
        print(f"wrote {src / 'pytorch_model.bin'}: {size / 1e9:.2f} GB in {write_s:.0f} s",
              flush=True)
        result = run_converter(src, out, args.convert_args.split())
        out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) \
            if out.exists() else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    try:
        import psutil

        total_mem = psutil.virtual_memory().total
    except ImportError:
        total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    report = {
        "shapes": "state-spaces/mamba2-1.3b (native layout, fp32 pytorch_model.bin, random)",
        "n_layer": args.n_layer,
        "checkpoint_bytes": size,
        "output_bytes": out_bytes,
        "machine": {"cpus": os.cpu_count(), "memory_bytes": total_mem,
                    "platform": platform.platform()},
        **result,
    }
    gib = 1024 ** 3
    rows = [
        ("command", report["command"]),
        ("exit status", report["returncode"]),
        ("checkpoint (.bin)", f"{size / 1e9:.2f} GB"),
        ("output (Orbax)", f"{out_bytes / 1e9:.2f} GB"),
        ("wall time", f"{report['wall_s']:.0f} s (user {report['user_s']:.0f} s, "
                      f"sys {report['sys_s']:.0f} s)"),
        ("peak RSS", f"{report['peak_rss_bytes'] / gib:.2f} GiB "
                     f"(machine {total_mem / gib:.0f} GiB, {os.cpu_count()} CPUs)"),
    ]
    print("\nconverter output:\n" + "\n".join("  " + line for line in
                                                report["output"].strip().splitlines()))
    print("\n| what | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if report["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
