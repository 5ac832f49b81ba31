"""The generation command: `longmamba-generate` or `python -m longmamba_jax generate`.

    longmamba-generate --model demo --prompt "There is an important info" --max-new-tokens 32
    longmamba-generate --model state-spaces/mamba2-130m --prompt "Hello" --temperature 0.7

The continuation is streamed to stdout; messages go to stderr. Compiled programs are kept on
disk (`longmamba_jax.compile_cache`) unless --no-compile-cache.
"""

from __future__ import annotations

import argparse
import sys
import time

from longmamba_jax import compile_cache

PROG = "longmamba-generate"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Generate text from a prompt with a Mamba / Mamba2 model.")
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="checkpoint directory, hub id, converted directory, 'demo' (the "
                             "bundled model) or 'tiny-random:mamba1|mamba2'")
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop once the text contains TEXT (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    parser.add_argument("--method", choices=("auto", "vanilla", "longmamba"), default="auto",
                        help="auto: LongMamba when a calibration is known, else vanilla")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="LongMamba calibration (.npz); default: the model directory's "
                             "calibration.npz, if any")
    parser.add_argument("--tokenizer", default=None, metavar="bytes|DIR",
                        help="default: the model directory's tokenizer (bytes for demo and "
                             "tiny-random)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="cast the weights (default: as stored)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="weight-only int8 projections after loading "
                             "(longmamba_jax.quantize; docs/generation.md)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-stream", action="store_true",
                        help="print the text at the end instead of as it is produced")
    parser.add_argument("-v", "--verbose", action="store_true", help="timings on stderr")
    compile_cache.add_cli_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    compile_cache.setup_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    import jax.numpy as jnp

    from longmamba_jax.lm import LanguageModel

    t0 = time.perf_counter()
    try:
        lm = LanguageModel.from_pretrained(
            args.model, tokenizer=args.tokenizer, calibration=args.calibration,
            method=args.method, dtype=None if args.dtype is None else getattr(jnp, args.dtype),
            backend=args.backend)
        if args.quantize:
            from longmamba_jax.quantization import quantize

            lm.params = quantize(lm.params)
        if args.verbose:
            print(f"{lm!r} (loaded in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        t1 = time.perf_counter()
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       stop_strings=args.stop, seed=args.seed)
        if args.no_stream:
            print(lm.generate(prompt, args.max_new_tokens, **options))
        else:
            for piece in lm.stream(prompt, args.max_new_tokens, **options):
                print(piece, end="", flush=True)
            print()
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"generated in {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
