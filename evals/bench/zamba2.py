"""Speed of a Zamba2-1.2B-shaped hybrid with random weights: longmamba_jax against transformers'
torch Zamba2 on the same shapes. No checkpoint needed.

Shapes (Zamba2-1.2B's config.json): d_model 2048, 38 Mamba2 layers (64 heads of 64, d_state
128, one group), a shared transformer block before layers 5, 11, …, 35 (one block, 32 heads of
128 over the 4096-wide [h, embedding], rotary embedding, LoRA adapters of rank 128 per use, MLP
8192), vocab 32000, tied embeddings; bf16 parameters.

Measured, each after an untimed first call whose extra time is reported as compile time
(first-call time − median), every timed call waited for:
- prefill tokens/s = L / t of `longmamba_jax.prefill` (batch 1, last logits + the cache) at
  each prompt length, and the peak device memory after it;
- decode tokens/s = b · steps / t of the on-device greedy decode loop after a `--prompt-len`
  prompt (KV room reserved before the loop, as `generate` does), per batch size;
- the same for the torch model (CUDA only; `--no-torch` skips it; in a process of its own,
  since JAX keeps most of the GPU's memory): a forward with
  `logits_to_keep=1` and `use_cache=True`, and `generate` with `min_new_tokens` so every step
  runs. A torch measurement that fails (e.g. out of memory) is recorded with its error.

    python evals/bench/zamba2.py --out zamba2_h200.json          # on a GPU
    python evals/bench/zamba2.py --small --out /tmp/zamba2.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import write_json
from longmamba_evals.bench.model_setup import peak_bytes, synthetic_longmamba
from longmamba_evals.bench.model_setup import random_tokens as _tokens
from longmamba_evals.bench.timing import paired_ratio, time_paired, timed
from longmamba_evals.tasks.runner import device_name
from longmamba_jax.generation.generate import _decode_loop
from longmamba_jax.generation.sampling import Greedy
from longmamba_jax.hybrid import Zamba2Config, reserve
from longmamba_jax.hybrid.config import to_hf_hybrid


def zamba2_1p2b(**overrides) -> Zamba2Config:
    base = dict(d_model=2048, n_layer=38, vocab_size=32000,
                layer_pattern="".join("h" if i % 6 == 5 else "m" for i in range(38)),
                d_state=128, mamba_nheads=64, ngroups=1, chunk_size=256, n_heads=32,
                n_kv_heads=32, ffn_dim=8192, num_mem_blocks=1, attn_adapters=True,
                adapter_rank=128, use_rope=True)
    base.update(overrides)
    return Zamba2Config(**base)


def small_config() -> Zamba2Config:
    return Zamba2Config.tiny(d_model=64, n_layer=6, vocab_size=256, layer_pattern="mmhmmh",
                             mamba_nheads=8, d_state=16, chunk_size=32, n_heads=4,
                             n_kv_heads=4, ffn_dim=128, num_mem_blocks=1, adapter_rank=8)


def jax_prefill(params, length: int, *, backend: str, repeats: int) -> dict:
    tokens = _tokens(1, length, params.config.vocab_size)
    first, times = timed(lambda: lmj.prefill(params, tokens, backend=backend), repeats)
    t = statistics.median(times)
    return {"impl": "jax", "kind": "prefill", "batch": 1, "length": length, "median_s": t,
            "tokens_per_s": length / t, "compile_s": max(first - t, 0.0), "times_s": times,
            "peak_bytes": peak_bytes()}


def jax_decode(params, *, batch: int, prompt_len: int, new_tokens: int, backend: str,
               repeats: int) -> dict:
    tokens = _tokens(batch, prompt_len, params.config.vocab_size, seed=batch)
    logits0, cache = lmj.prefill(params, tokens, backend=backend)
    cache = jax.block_until_ready(reserve(cache, new_tokens, dtype=params.dtype))
    loop = functools.partial(
        _decode_loop, params, logits0=logits0, key=jax.random.PRNGKey(0), filters=None,
        eos_ids=jnp.zeros((0,), jnp.int32), pad_id=jnp.int32(0), sampler=Greedy(),
        max_new_tokens=new_tokens, backend=lmj.resolve_backend(backend), return_logits=False,
    )
    copies = [jax.tree.map(jnp.copy, cache) for _ in range(repeats + 1)]  # the loop donates
    jax.block_until_ready(copies)
    first, times = timed(lambda: loop(copies.pop())[:4], repeats)
    t = statistics.median(times)
    steps = new_tokens - 1  # token 0 comes from the prefill logits
    return {"impl": "jax", "kind": "decode", "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "median_s": t, "tokens_per_s": batch * steps / t,
            "step_ms": 1e3 * t / steps, "compile_s": max(first - t, 0.0), "times_s": times}


def jax_longmamba_overhead(params, length: int, *, backend: str, rounds: int) -> dict:
    """LongMamba's prefill overhead: `prefill` with a LongMamba-shaped filter on the Mamba2
    layers (half the heads global, θ = their median Δ; `synthetic_longmamba`) against plain,
    interleaved round by round."""
    tokens = _tokens(1, length, params.config.vocab_size)
    method = synthetic_longmamba(params, min(length, 2048))
    plain = jax.jit(lambda p, t: lmj.prefill(p, t, backend=backend))
    filtered = jax.jit(lambda p, t: lmj.prefill(p, t, method=method, backend=backend))
    medians, per_round = time_paired({"plain": (plain, (params, tokens)),
                                      "longmamba": (filtered, (params, tokens))}, rounds=rounds)
    return {"impl": "jax", "kind": "longmamba", "batch": 1, "length": length,
            "median_s": medians["longmamba"], "plain_median_s": medians["plain"],
            "tokens_per_s": length / medians["longmamba"],
            "overhead_pct": 100 * (paired_ratio(per_round, "longmamba", "plain") - 1),
            "compile_s": 0.0}


def _official_kernels() -> str:
    """Puts the official mamba_ssm / causal_conv1d (evals/bench/official.py) where transformers
    looks for them before it is imported, so its Zamba2 runs their fused kernels as their users
    have it; says which path transformers will take."""
    from longmamba_evals.bench.official import has_causal_conv1d, import_mamba_ssm

    try:
        mamba_ssm = import_mamba_ssm()
    except ImportError as exc:
        return f"transformers' torch path (no mamba_ssm: {exc})"
    conv = "causal_conv1d" if has_causal_conv1d() else "torch conv1d"
    return f"mamba_ssm {mamba_ssm.__version__} kernels + {conv}"


def torch_model(config: Zamba2Config, torch):
    import transformers

    hf = to_hf_hybrid(config)
    hf.pop("architectures")
    hf.pop("model_type")
    with torch.device("cuda"):
        model = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**hf))
    return model.to(torch.bfloat16).eval()


def _torch_row(fn, torch, repeats: int, **row) -> dict:
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            first, times = timed(fn, repeats, sync=lambda _: torch.cuda.synchronize())
    except Exception as exc:  # noqa: BLE001 - recorded, e.g. CUDA out of memory
        return {"impl": "torch", **row, "error": f"{type(exc).__name__}: {exc}"[:300]}
    t = statistics.median(times)
    return {"impl": "torch", **row, "median_s": t, "compile_s": max(first - t, 0.0),
            "times_s": times, "peak_bytes": int(torch.cuda.max_memory_allocated())}


def torch_prefill(model, length: int, torch, repeats: int) -> dict:
    ids = torch.as_tensor(np.asarray(_tokens(1, length, model.config.vocab_size)),
                          device="cuda", dtype=torch.long)
    row = _torch_row(lambda: model(ids, use_cache=True, logits_to_keep=1), torch, repeats,
                     kind="prefill", batch=1, length=length)
    if "median_s" in row:
        row["tokens_per_s"] = length / row["median_s"]
    return row


def torch_decode(model, *, batch: int, prompt_len: int, new_tokens: int, torch,
                 repeats: int) -> dict:
    ids = torch.as_tensor(np.asarray(_tokens(batch, prompt_len, model.config.vocab_size,
                                             seed=batch)), device="cuda", dtype=torch.long)
    prefill = _torch_row(lambda: model(ids, use_cache=True, logits_to_keep=1), torch, repeats,
                         kind="prefill")

    def gen():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)

    row = _torch_row(gen, torch, repeats, kind="decode", batch=batch, prompt_len=prompt_len,
                     new_tokens=new_tokens)
    if "median_s" in row and "median_s" in prefill:  # generate = prefill + the steps
        t = max(row["median_s"] - prefill["median_s"], 1e-9)
        steps = new_tokens - 1
        row.update(tokens_per_s=batch * steps / t, step_ms=1e3 * t / steps)
    return row


def _table(rows: list[dict]) -> str:
    cols = ["impl", "what", "batch", "length", "tokens/s", "median ms", "step ms", "compile s",
            "peak GiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        length = r.get("length", f"{r.get('prompt_len')} + {r.get('new_tokens')}")
        if "error" in r:
            cells = [r["impl"], r["kind"], r["batch"], length, r["error"][:60], "", "", "", ""]
        else:
            peak = r.get("peak_bytes")
            cells = [r["impl"], r["kind"], r["batch"], length, f"{r['tokens_per_s']:,.0f}",
                     f"{1e3 * r['median_s']:.1f}",
                     f"{r['step_ms']:.2f}" if "step_ms" in r else "", f"{r['compile_s']:.1f}",
                     f"{peak / 2**30:.1f}" if peak else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto", choices=lmj.BACKENDS)
    p.add_argument("--prefill-lengths", default="4096,16384,65536,131072")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--longmamba-lengths", default="16384",
                   help="prefill lengths at which LongMamba's overhead is measured")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (overhead)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no new torch row after this many seconds (the rest are recorded as "
                        "skipped)")
    p.add_argument("--no-torch", dest="torch", action="store_false",
                   help="skip transformers' torch Zamba2 (it runs only with CUDA anyway)")
    p.add_argument("--no-jax", dest="jax", action="store_false",
                   help="time the torch model only")
    p.add_argument("--small", action="store_true", help="tiny model, short lengths (CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.small:
        config, dtype = small_config(), jnp.float32
        lengths, batches, prompt_len, new_tokens = [64, 2048], [1, 2], 32, 8
        longmamba_lengths = [256]
    else:
        config, dtype = zamba2_1p2b(), jnp.bfloat16
        lengths = [int(x) for x in args.prefill_lengths.split(",") if x]
        batches = [int(x) for x in args.decode_batches.split(",") if x]
        prompt_len, new_tokens = args.prompt_len, args.new_tokens
        longmamba_lengths = [int(x) for x in args.longmamba_lengths.split(",") if x]
    shapes = jax.eval_shape(lambda: lmj.init_params(config, 0, dtype).weights)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    if args.jax:
        params = jax.block_until_ready(jax.jit(lambda: lmj.init_params(config, 0, dtype))())
    print(f"zamba2: {n_params / 1e6:,.1f}M parameters ({jnp.dtype(dtype).name}) on "
          f"{device_name()}, backend {args.backend}", flush=True)
    rows = []
    for length in lengths if args.jax else []:
        rows.append(jax_prefill(params, length, backend=args.backend, repeats=args.repeats))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    for length in longmamba_lengths if args.jax else []:
        rows.append(jax_longmamba_overhead(params, length, backend=args.backend,
                                           rounds=args.rounds))
        print(f"LongMamba prefill overhead at {length}: {rows[-1]['overhead_pct']:+.2f}%",
              flush=True)
    for batch in batches if args.jax else []:
        rows.append(jax_decode(params, batch=batch, prompt_len=prompt_len,
                               new_tokens=new_tokens, backend=args.backend,
                               repeats=args.repeats))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    torch_note = "skipped (--no-torch)"
    if args.torch and args.jax and not args.small:
        # JAX holds most of the GPU's memory: the torch model runs in a process of its own
        with tempfile.TemporaryDirectory() as tmp:
            argv_torch = [a for a in (argv if argv is not None else sys.argv[1:])
                          if a != "--no-jax"]
            if "--out" in argv_torch:
                i = argv_torch.index("--out")
                del argv_torch[i:i + 2]
            # the child imports jax too: it must not take the GPU memory torch needs
            env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                   "JAX_PLATFORMS": "cpu"}
            subprocess.run([sys.executable, __file__, *argv_torch, "--no-jax", "--out",
                            f"{tmp}/torch.json"], check=False, env=env)
            if os.path.exists(f"{tmp}/torch.json"):
                with open(f"{tmp}/torch.json") as f:
                    sub = json.load(f)
                rows += sub["results"]
                torch_note = sub["torch"]
            else:
                torch_note = "failed: the torch process wrote no results"
    elif args.torch:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            torch_note = "skipped: torch has no CUDA here"
        else:
            kernels = _official_kernels()
            model = torch_model(config, torch)
            torch_note = (f"transformers Zamba2ForCausalLM, bf16, torch {torch.__version__}, "
                          f"{kernels}")
            start = time.perf_counter()
            spent = lambda: (args.budget_s is not None
                             and time.perf_counter() - start > args.budget_s)
            skipped = {"impl": "torch", "error": "skipped: time budget spent"}
            for length in lengths:
                rows.append({**skipped, "kind": "prefill", "batch": 1, "length": length}
                            if spent() else torch_prefill(model, length, torch, args.repeats))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
            for batch in batches:
                rows.append({**skipped, "kind": "decode", "batch": batch,
                             "prompt_len": prompt_len, "new_tokens": new_tokens} if spent()
                            else torch_decode(model, batch=batch, prompt_len=prompt_len,
                                              new_tokens=new_tokens, torch=torch,
                                              repeats=args.repeats))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\ntorch: {torch_note}\n")
    print(_table(rows))
    result = {"device": device_name(), "jax": jax.__version__, "longmamba_jax": lmj.__version__,
              "python": platform.python_version(), "config": config.to_dict(),
              "n_params": n_params, "dtype": jnp.dtype(dtype).name, "backend": args.backend,
              "resolved_backend": str(lmj.resolve_backend(args.backend)), "small": args.small,
              "torch": torch_note, "results": rows}
    if args.out:
        write_json(args.out, result, indent=2)
        print(f"\nsaved {args.out}")
    return result


if __name__ == "__main__":
    main()
