"""Weight-only int8 (`longmamba_jax.quantize`) against the float weights it was made from.

Sections:
- `decode:ARCH` (a GPU): decode tokens/s at each batch of the mamba2-1.3b- and
  mamba-1.4b-shaped random bf16 models (`model_setup.py`), bf16 weights against int8 weights,
  per decode implementation: both loops compiled ahead (compile time, kernels per step from
  the optimized HLO, `model_decode.step_census`), then timed in interleaved rounds
  (`timing.time_paired`) with the int8 / bf16 speed ratio taken round by round; plus the
  relative error of the prompt's last logits.
- `quality` (CPU is enough): the bundled demo model, bf16 against int8: the logits' relative
  error and greedy agreement on text windows, perplexity (`evals/tasks/perplexity.py`) and
  passkey accuracy (`evals/tasks/passkey.py`), vanilla and LongMamba.
- `sizes` (shapes only, any machine): the weight bytes of the two full-size models, stored and
  read per decode step (the embedding table is only gathered from when a head of its own
  exists), bf16 against int8.

    python evals/bench/quantize.py --out quantize.json                      # on a GPU
    python evals/bench/quantize.py --sections quality --out quality.json    # the demo, CPU
    python evals/bench/quantize.py --sections sizes                         # bytes, any machine
    python evals/bench/quantize.py --small                                  # CPU smoke run

The JSON is rewritten after every row, so a run cut short by its budget keeps what finished.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import rel_err, write_json
from longmamba_evals.bench.model_decode import _decode_once, step_census
from longmamba_evals.bench.model_setup import (
    model_config,
    random_params,
    random_tokens,
)
from longmamba_evals.bench.timing import paired_ratio, time_paired
from longmamba_evals.tasks.runner import device_name

ARCHS = ("mamba2", "mamba1")


def _weight_bytes(params, *, per_step: bool = False) -> int:
    """Bytes of the weights; `per_step`: those a decode step reads (all, less the embedding
    table when the model has a head of its own: a step gathers b of its rows)."""
    w = params.weights
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))
    if per_step and "lm_head" in w:
        total -= sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w["embedding"]))
    return total


def sec_sizes(args, out: dict, save) -> None:
    """Stored and per-step weight bytes of the full-size models (shapes only, nothing built)."""
    res = out.setdefault("sizes", {})
    for arch in ARCHS:
        config = model_config(arch, False)
        init = functools.partial(lmj.init_params, config, 0, jnp.bfloat16)
        variants = {"bf16": jax.eval_shape(init),
                    "int8": jax.eval_shape(lambda init=init: lmj.quantize(init()))}
        res[arch] = {f"{kind}_{name}": _weight_bytes(p, per_step=kind == "step")
                     for name, p in variants.items() for kind in ("stored", "step")}
        print(f"{arch}: weights stored {res[arch]['stored_bf16'] / 1e9:.3f} GB bf16, "
              f"{res[arch]['stored_int8'] / 1e9:.3f} GB int8; read per decode step "
              f"{res[arch]['step_bf16'] / 1e9:.3f} / {res[arch]['step_int8'] / 1e9:.3f} GB "
              f"({res[arch]['step_bf16'] / res[arch]['step_int8']:.2f}x)", flush=True)
    save()


def sec_decode(args, arch: str, out: dict, save) -> None:
    """bf16 against int8 decode of `arch`, each batch × implementation a row of out["rows"]."""
    params = random_params(arch, args.small).astype(jnp.bfloat16)  # (fp32 when small)
    qparams = jax.block_until_ready(lmj.quantize(params))
    variants = {"bf16": params, "int8": qparams}
    out.setdefault("weight_bytes", {})[arch] = {k: _weight_bytes(p) for k, p in variants.items()}
    backend = lmj.resolve_backend(args.backend)
    steps = args.new_tokens - 1
    for batch in args.batches:
        tokens = random_tokens(batch, args.prompt_len, params.config.vocab_size, seed=batch)
        logits0, cache = jax.block_until_ready(lmj.prefill(params, tokens, backend=args.backend))
        q_logits0 = lmj.prefill(qparams, tokens, backend=args.backend)[0]
        logits_err = rel_err(q_logits0, logits0)
        for impl in args.impls:
            if time.perf_counter() - args.t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipping {arch} b={batch} "
                      f"{impl}", flush=True)
                out.setdefault("skipped", []).append(f"{arch} b={batch} {impl}")
                continue
            # the greedy decode loop of `generate` (no EOS: every step runs)
            run = jax.jit(functools.partial(_decode_once, new_tokens=args.new_tokens,
                                            impl=impl, backend=backend))
            calls, row = {}, {"arch": arch, "batch": batch, "impl": impl,
                              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                              "prefill_logits_rel_err": logits_err}
            for name, p in variants.items():
                t0 = time.perf_counter()
                compiled = run.lower(p, cache, logits0).compile()
                row[f"compile_s_{name}"] = time.perf_counter() - t0
                census = step_census(compiled.as_text(), params.config.n_layer)
                row[f"kernels_per_step_{name}"] = census.get("kernels")
                row[f"census_{name}"] = census.get("by_name")
                calls[name] = (compiled, (p, cache, logits0))
            medians, rounds = time_paired(calls, rounds=args.rounds, min_batch_s=0.0)
            for name, t in medians.items():
                row[f"tokens_per_s_{name}"] = batch * steps / t
                row[f"step_ms_{name}"] = 1e3 * t / steps
                row[f"round_s_{name}"] = rounds[name]
            row["speedup"] = paired_ratio(rounds, "bf16", "int8")  # time bf16 / time int8
            out["rows"].append(row)
            print(f"{arch} b={batch} {impl}: bf16 {row['tokens_per_s_bf16']:,.0f} tok/s "
                  f"({row['step_ms_bf16']:.2f} ms/step), int8 {row['tokens_per_s_int8']:,.0f} "
                  f"tok/s ({row['step_ms_int8']:.2f} ms/step), int8 / bf16 speed "
                  f"{row['speedup']:.2f}x; kernels/step {row['kernels_per_step_bf16']} / "
                  f"{row['kernels_per_step_int8']}; prefill logits rel. err {logits_err:.1e}",
                  flush=True)
            save()
        del cache, logits0


def sec_quality(args, out: dict, save) -> None:
    """The demo model, bf16 against int8: logits, perplexity and passkey accuracy."""
    from longmamba_evals.tasks.methods import MethodSpec
    from longmamba_evals.tasks.passkey import run_passkey
    from longmamba_evals.tasks.perplexity import run_perplexity, window_starts
    from longmamba_evals.tasks.runner import LMRunner
    from longmamba_evals.tasks.text import load_text

    demo = lmj.demo_model()
    tok = demo.tokenizer
    variants = {"bf16": demo.params, "int8": lmj.quantize(demo.params)}
    vocab = demo.params.config.vocab_size
    ids = np.asarray(tok.encode(load_text(None)), np.int32)
    res = out.setdefault("quality", {"model": "demo", "weight_bytes": {
        k: _weight_bytes(p) for k, p in variants.items()}, "logits": [], "perplexity": {},
        "passkey": {}})
    for length in args.ppl_lengths:  # the logits on `windows` text windows of each length
        starts = window_starts(len(ids), length, args.windows)
        batch = np.stack([ids[s:s + length] for s in starts])
        ref, got = (np.asarray(lmj.forward(p, batch, backend=args.backend))[..., :vocab]
                    for p in variants.values())
        row = {"length": length, "windows": len(starts), "logits_rel_err": rel_err(got, ref),
               "max_abs_err": float(np.abs(got - ref).max()),
               "argmax_agree": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}
        res["logits"].append(row)
        print(f"demo logits, {length} tokens x {len(starts)}: rel. err "
              f"{row['logits_rel_err']:.2e}, max abs {row['max_abs_err']:.3f}, greedy agree "
              f"{row['argmax_agree']:.4f}", flush=True)
        save()
    specs = [MethodSpec("vanilla"), MethodSpec("longmamba", calibration=demo.calibration)]
    for name, params in variants.items():
        runner = LMRunner(params, backend=args.backend, eos_token_id=tok.eos_token_id)
        for spec in specs:
            r = run_perplexity(runner, tok, spec, lengths=args.ppl_lengths,
                               windows=args.windows, eval_tokens=100, show_progress=False)
            res["perplexity"][f"{spec.name}/{name}"] = dict(zip(
                args.ppl_lengths, r["curves"]["perplexity"]["y"], strict=True))
            r = run_passkey(runner, tok, spec, lengths=args.passkey_lengths,
                            samples_per_depth=args.passkey_samples, seed=0,
                            show_progress=False)
            res["passkey"][f"{spec.name}/{name}"] = dict(zip(
                args.passkey_lengths, r["curves"]["accuracy"]["y"], strict=True))
            print(f"demo {spec.name} {name}: perplexity {res['perplexity'][f'{spec.name}/{name}']}"
                  f", passkey % {res['passkey'][f'{spec.name}/{name}']}", flush=True)
            save()


def table(out: dict) -> str:
    lines = []
    if out.get("rows"):
        lines += ["| model | batch | `decode_impl` | bf16 tok/s (ms/step) | int8 tok/s (ms/step) "
                  "| int8 / bf16 | kernels/step bf16, int8 |", "|---|---|---|---|---|---|---|"]
        for r in out["rows"]:
            lines.append(
                f"| {r['arch']} | {r['batch']} | `{r['impl']}` | {r['tokens_per_s_bf16']:,.0f} "
                f"({r['step_ms_bf16']:.2f}) | {r['tokens_per_s_int8']:,.0f} "
                f"({r['step_ms_int8']:.2f}) | {r['speedup']:.2f} | "
                f"{r['kernels_per_step_bf16']}, {r['kernels_per_step_int8']} |")
        for arch, wb in out.get("weight_bytes", {}).items():
            lines.append(f"\n{arch}: weights {wb['bf16'] / 1e6:,.1f} MB bf16, "
                         f"{wb['int8'] / 1e6:,.1f} MB int8")
    if out.get("sizes"):
        lines += ["", "| model | stored bf16, int8 (GB) | read per decode step bf16, int8 (GB) "
                  "| ratio |", "|---|---|---|---|"]
        lines += [f"| {arch} | {s['stored_bf16'] / 1e9:.3f}, {s['stored_int8'] / 1e9:.3f} | "
                  f"{s['step_bf16'] / 1e9:.3f}, {s['step_int8'] / 1e9:.3f} | "
                  f"{s['step_bf16'] / s['step_int8']:.2f} |" for arch, s in out["sizes"].items()]
    q = out.get("quality")
    if q:
        lines += ["", "| demo, length | logits rel. err | greedy agree |", "|---|---|---|"]
        lines += [f"| {r['length']} | {r['logits_rel_err']:.2e} | {r['argmax_agree']:.4f} |"
                  for r in q["logits"]]
        for metric in ("perplexity", "passkey"):
            if not q[metric]:
                continue
            keys = list(q[metric])
            lengths = list(q[metric][keys[0]])
            lines += ["", f"| {metric} | " + " | ".join(str(n) for n in lengths) + " |",
                      "|---" * (len(lengths) + 1) + "|"]
            fmt = "{:.3f}" if metric == "perplexity" else "{:.0f}"
            lines += [f"| {k} | " + " | ".join(fmt.format(v) for v in q[metric][k].values())
                      + " |" for k in keys]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--small", action="store_true",
                   help="tiny models, short lengths (a CPU smoke run of the decode section)")
    p.add_argument("--sections", default="sizes,decode:mamba2,decode:mamba1",
                   help="comma list of decode:ARCH (ARCH in mamba2, mamba1), quality, sizes")
    p.add_argument("--backend", default="auto", choices=lmj.BACKENDS)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--impls", default="fused", help="decode implementations (scan,unrolled,"
                   "fused); fused is the fast one on a GPU")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="start no decode row after this many seconds")
    p.add_argument("--ppl-lengths", default="1000,2000,4000",
                   help="quality: window lengths of the logits and the perplexity")
    p.add_argument("--windows", type=int, default=8, help="quality: windows per length")
    p.add_argument("--passkey-lengths", default="1000,4000,8000",
                   help="quality: passkey prompt lengths")
    p.add_argument("--passkey-samples", type=int, default=2,
                   help="quality: keys per (length, depth); 5 depths")
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.t_start = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        kind, _, arch = s.partition(":")
        if not (s in ("quality", "sizes") or (kind == "decode" and arch in ARCHS)):
            raise SystemExit(f"unknown section {s!r}: decode:mamba2, decode:mamba1, quality, "
                             "sizes")
    args.impls = [i for i in args.impls.split(",") if i]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.ppl_lengths = [int(n) for n in args.ppl_lengths.split(",") if n]
    args.passkey_lengths = [int(n) for n in args.passkey_lengths.split(",") if n]
    if args.small:
        args.batches, args.prompt_len, args.new_tokens, args.rounds = [1, 2], 32, 8, 2
        args.ppl_lengths, args.windows, args.passkey_lengths = [600], 2, [600]
        args.passkey_samples = 1
    out = {"device": device_name(), "jax": jax.__version__, "longmamba_jax": lmj.__version__,
           "python": platform.python_version(), "small": args.small, "argv": argv,
           "backend": args.backend, "resolved_backend": str(lmj.resolve_backend(args.backend)),
           "configs": {s.partition(":")[2]: model_config(s.partition(":")[2], args.small)
                       .to_dict() for s in sections if s.startswith("decode:")},
           "rows": []}

    def save():
        if args.out:
            write_json(args.out, out)

    for s in sections:
        if s == "quality":
            sec_quality(args, out, save)
        elif s == "sizes":
            sec_sizes(args, out, save)
        else:
            sec_decode(args, s.partition(":")[2], out, save)
    out["wall_s"] = time.perf_counter() - args.t_start
    save()
    print(table(out), flush=True)
    if args.out:
        Path(os.path.splitext(args.out)[0] + ".md").write_text(table(out) + "\n")
    return out


if __name__ == "__main__":
    main()
