"""Command line of the evaluations: `python -m evals <task> ...` or `longmamba-evals <task> ...`.

    python -m evals passkey    --model SRC --tokenizer bytes|DIR --method vanilla --out DIR \
        [--lengths 1k,2k,4k] [--depths 0,.25,.5,.75,1] [--samples 1]
    python -m evals ruler      ... [--tasks niah_single_noise,vt,...] [--samples 5]
    python -m evals perplexity ... [--text FILE] [--windows 10] [--eval-tokens 100]
    python -m evals longbench  ... --data-dir DIR [--datasets hotpotqa,...] [--e] [--max-length]
    python -m evals latency    ... [--repeats 5] [--warmup 1]
    (any task) ... --quantize int8     weight-only int8 projections (`longmamba_jax.quantize`)

`--method` takes one method or a comma list (`vanilla,longmamba,decimamba`); each method's run
is saved as OUT/{task}_{method}.json/.md, and OUT/{task}.md/.png compare every method found in
OUT. Lengths accept k/m suffixes with k = 1,000. `--model tiny-random:mamba2` (or `:mamba1`)
builds a tiny random model with the tokenizer's vocabulary: only for checking the mechanics.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from longmamba_evals.tasks.lengths import parse_lengths
from longmamba_evals.tasks.methods import MethodSpec, base_name, check_method
from longmamba_jax.model_spec import parse_model_spec

TASK_NAMES = ("passkey", "ruler", "perplexity", "longbench", "latency")


def _floats(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad list of numbers {spec!r}") from e


def _ints(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad list of integers {spec!r}") from e


def _lengths(spec: str) -> list[int]:
    try:
        return parse_lengths(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _methods(spec: str) -> list[str]:
    try:
        names = [check_method(m.strip()) for m in spec.split(",") if m.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("no method given")
    return names


def _common(p: argparse.ArgumentParser, default_lengths: str | None) -> None:
    g = p.add_argument_group("model and method")
    g.add_argument("--model", required=True,
                   help="checkpoint dir or hub id (longmamba_jax.load), 'demo' (the bundled "
                   "model), or tiny-random:mamba1|mamba2")
    g.add_argument("--tokenizer", required=True, help="'bytes' or a local HF tokenizer dir")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="run the model with weight-only int8 projections "
                   "(longmamba_jax.quantize; docs/generation.md, \"Weight-only int8\")")
    g.add_argument("--method", type=_methods, default=["vanilla"],
                   help="vanilla|longmamba|longmamba-RULE|decimamba, or a comma list "
                   "(default: vanilla); RULE: a LongMamba token-selection rule (threshold, "
                   "channelwise_topk, all_topk, alpha, offline, bound, norm)")
    g.add_argument("--rule-k", type=int, default=None,
                   help="tokens kept by the top-k rules (default: the calibration's train_len)")
    g.add_argument("--calibration",
                   help="LongMamba calibration file; without one, LongMamba is calibrated on "
                   "the fly on the task's text (or the demo's own calibration is used)")
    g.add_argument("--train-len", type=int, default=None,
                   help="the model's training length, for calibrating on the fly (default: "
                   "512 for the demo, 64 for tiny-random models)")
    g.add_argument("--channel-threshold", type=float, default=0.05, help="LongMamba c_thr")
    g.add_argument("--scale", type=float, default=1.0, help="LongMamba b (Δ > b·θ_S is kept)")
    g.add_argument("--min-len", type=int, default=None,
                   help="LongMamba switch-on length (default: the library's, S > L_train)")
    g.add_argument("--decimamba-layers", type=_ints, default=None,
                   help="DeciMamba layers, e.g. 12,13,14 (default: the middle layer)")
    g.add_argument("--decimamba-L-base", type=int, default=2000, help="DeciMamba L_base")
    g.add_argument("--decimamba-beta", type=float, default=0.5, help="DeciMamba β")
    g.add_argument("--decimamba-min-seq-len", type=int, default=20, help="DeciMamba min_seq_len")
    g.add_argument("--backend", default="auto", help="scan backend (auto|reference|associative|"
                   "pallas)")
    g.add_argument("--seed", type=int, default=0, help="seed of prompts (and of tiny models)")
    g.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="spread each batch over N devices (a mesh data=N; the weights "
                   "replicated): pass a --batch-size that is a multiple of N; smaller batches "
                   "are padded with copies of their last prompt (docs/sharding.md)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output directory")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    if default_lengths is not None:
        p.add_argument("--lengths", type=_lengths, default=parse_lengths(default_lengths),
                       help=f"context lengths, k = 1000 (default: {default_lengths})")


def build_parser(prog: str = "longmamba-evals") -> argparse.ArgumentParser:
    """The argument parser of `longmamba-evals` / `python -m evals`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    p = sub.add_parser("passkey", help="passkey retrieval at depths × lengths")
    _common(p, "1k,2k,4k,8k,16k,32k,64k,128k")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--text", help="filler text file (default: bundled LAMBADA excerpt)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)

    from longmamba_evals.tasks.ruler import TASKS

    p = sub.add_parser("ruler", help="RULER-style synthetic tasks")
    _common(p, "4k,8k,16k,32k,64k,128k")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of " + ", ".join(TASKS))
    p.add_argument("--samples", type=int, default=5, help="prompts per (task, length)")
    p.add_argument("--text", help="essay haystack text (default: bundled LAMBADA excerpt)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override the per-task generation length")
    p.add_argument("--batch-size", type=int, default=1)

    p = sub.add_parser("perplexity", help="perplexity on the last tokens of long windows")
    _common(p, "2k,4k,8k,16k,32k,64k,100k")
    p.add_argument("--text", help="long text file (default: bundled LAMBADA excerpt)")
    p.add_argument("--windows", type=int, default=10, help="windows per length")
    p.add_argument("--eval-tokens", type=int, default=100, help="scored tokens per window")
    p.add_argument("--batch-size", type=int, default=1)

    p = sub.add_parser("longbench", help="LongBench / LongBench-E on local JSONL files")
    _common(p, None)
    p.add_argument("--data-dir", required=True, help="dir with {dataset}.jsonl files")
    p.add_argument("--datasets", default=None, help="comma list (default: all files found)")
    p.add_argument("--e", action="store_true", help="LongBench-E ({dataset}_e.jsonl, buckets)")
    p.add_argument("--max-length", type=_lengths, default=[7_500],
                   help="prompt token budget, middle-truncated beyond (default 7500)")
    p.add_argument("--limit", type=int, default=None, help="samples per dataset")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override the published answer lengths")

    p = sub.add_parser("latency", help="prefill latency of each method vs vanilla")
    _common(p, "8k,16k,32k,64k")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--text", help="text the prompts are cut from")
    return parser


def _spec(args, name: str, calibration=None) -> MethodSpec:
    return MethodSpec(
        name, calibration=calibration if base_name(name) == "longmamba" else None,
        rule_k=args.rule_k,
        channel_threshold=args.channel_threshold, scale=args.scale, min_len=args.min_len,
        decimamba_layers=tuple(args.decimamba_layers) if args.decimamba_layers else None,
        L_base=args.decimamba_L_base, beta=args.decimamba_beta,
        min_seq_len=args.decimamba_min_seq_len)


def run(args: argparse.Namespace) -> list[dict]:
    """Runs the parsed command; returns the result dicts (also saved under `args.out`)."""
    from longmamba_evals.tasks.runner import LMRunner, load_model
    from longmamba_jax.tokenizer import load_tokenizer

    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the plots need matplotlib: pip install 'longmamba-jax[evals]' "
                             "(or pass --no-plot)") from None
    calibration = args.calibration
    # validate the method settings before loading anything
    [_spec(args, m, calibration or "(on the fly)") for m in args.method]
    if (calibration is None and args.train_len is None
            and any(base_name(m) == "longmamba" for m in args.method)
            and parse_model_spec(args.model).kind == "checkpoint"):
        raise ValueError("LongMamba needs a calibration: pass --calibration FILE (make one once "
                         "with longmamba-calibrate) or --train-len N to calibrate on the fly")
    if args.data_parallel < 1:
        raise ValueError(f"--data-parallel must be >= 1, got {args.data_parallel}")
    tokenizer = load_tokenizer(args.tokenizer)
    params = load_model(args.model, tokenizer, seed=args.seed)
    if args.quantize:  # after loading; a calibration made on the fly is of these weights
        import longmamba_jax as lm

        params = lm.quantize(params)
    if calibration is None and any(base_name(m) == "longmamba" for m in args.method):
        calibration = _calibration_on_the_fly(args, params, tokenizer)
    specs = [_spec(args, m, calibration) for m in args.method]
    if args.data_parallel > 1:
        from jax.sharding import PartitionSpec

        import longmamba_jax as lm

        params = lm.shard(params, lm.make_mesh(data=args.data_parallel),
                          rules=[(r".*", PartitionSpec())])  # every weight replicated
    runner = LMRunner(params, backend=args.backend,
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
    if args.data_parallel > 1:
        runner = _PaddedBatches(runner, args.data_parallel)
    show = not args.no_progress
    common = {"show_progress": show}
    results = []
    if args.task == "latency":
        from longmamba_evals.tasks.latency import run_latency

        results = run_latency(runner, tokenizer, specs, lengths=args.lengths,
                              batch_size=args.batch_size, warmup=args.warmup,
                              repeats=args.repeats, text=args.text, **common)
    else:
        for spec in specs:
            if args.task == "passkey":
                from longmamba_evals.tasks.passkey import run_passkey

                r = run_passkey(runner, tokenizer, spec, lengths=args.lengths, depths=args.depths,
                                samples_per_depth=args.samples, text=args.text, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                **common)
            elif args.task == "ruler":
                from longmamba_evals.tasks.ruler import run_ruler

                tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
                r = run_ruler(runner, tokenizer, spec, tasks=tasks, lengths=args.lengths,
                              num_samples=args.samples, text=args.text, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              **common)
            elif args.task == "perplexity":
                from longmamba_evals.tasks.perplexity import run_perplexity

                r = run_perplexity(runner, tokenizer, spec, lengths=args.lengths,
                                   windows=args.windows, eval_tokens=args.eval_tokens,
                                   text=args.text, batch_size=args.batch_size, **common)
            else:
                from longmamba_evals.tasks.longbench import run_longbench

                datasets = ([d.strip() for d in args.datasets.split(",") if d.strip()]
                            if args.datasets else None)
                r = run_longbench(runner, tokenizer, spec, data_dir=args.data_dir,
                                  datasets=datasets, e=args.e, max_length=args.max_length[0],
                                  limit=args.limit, max_new_tokens=args.max_new_tokens,
                                  **common)
            results.append(r)
            _save(args, r)  # each method as it finishes: a run cut short keeps what it did
    if args.task == "latency":
        for r in results:
            _save(args, r)
    return results


def _save(args: argparse.Namespace, result: dict) -> None:
    from longmamba_evals.tasks.outputs import save_run

    result["settings"] = {"model": args.model, **result["settings"]}
    if args.quantize:
        result["settings"]["quantize"] = args.quantize
    paths = save_run(args.out, result, plot=not args.no_plot)
    print(f"saved {paths['json']}", file=sys.stderr)


class _PaddedBatches:
    """A runner whose batches are padded to a multiple of the data-parallel size with copies
    of their last row (each row's result is its own: the copies' are dropped)."""

    def __init__(self, runner, size: int):
        self.runner, self.size = runner, size
        self.n_layer, self.vocab_size = runner.n_layer, runner.vocab_size

    def _pad(self, tokens):
        import numpy as np

        tokens = np.asarray(tokens)
        extra = -len(tokens) % self.size
        return np.concatenate([tokens, np.repeat(tokens[-1:], extra, axis=0)]), len(tokens)

    def generate(self, tokens, max_new_tokens, method):
        padded, n = self._pad(tokens)
        return self.runner.generate(padded, max_new_tokens, method)[:n]

    def logits(self, tokens, last_n, method):
        padded, n = self._pad(tokens)
        return self.runner.logits(padded, last_n, method)[:n]


def _calibration_on_the_fly(args, params, tokenizer):
    """LongMamba without --calibration: the demo's own, or one made now from the task's text
    (with a note on stderr saying so and how to make one once)."""
    if parse_model_spec(args.model).kind == "demo":
        print("note: no --calibration given; using the demo model's bundled calibration",
              file=sys.stderr)
        import longmamba_jax as lm

        return lm.demo_model().calibration
    train_len = 64 if args.train_len is None else args.train_len  # set for a checkpoint
    import numpy as np

    import longmamba_jax as lm
    from longmamba_evals.tasks.text import DEFAULT_TEXT, load_text

    text_path = getattr(args, "text", None) or DEFAULT_TEXT
    stream = np.asarray(tokenizer.encode(load_text(text_path)), np.int64)
    windows = int(max(1, min(100, stream.size // train_len)))
    print(f"note: no --calibration given; calibrating LongMamba now on {windows} windows of "
          f"{train_len} tokens of {os.path.basename(text_path)} (make one once with "
          "longmamba-calibrate and pass --calibration)", file=sys.stderr)
    return lm.calibrate(params, stream, train_len=train_len, num_windows=windows,
                        backend=args.backend, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None, prog: str = "longmamba-evals") -> None:
    """Entry point of `longmamba-evals` and `python -m evals` (`prog` names it in --help)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(prog="python evals/tasks/cli.py")
