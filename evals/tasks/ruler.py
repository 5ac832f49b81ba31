"""RULER-style synthetic tasks, generated locally and seeded (Hsieh et al., 2024).

Tasks (RULER's templates and answer prefixes; the answer prefix ends the prompt):

    niah_single_noise   one needle "One of the special magic numbers for KEY is: VALUE." in
                        repeated noise sentences ("The grass is green. ...")
    niah_single_essay   the same needle in essay text (the bundled LAMBADA excerpt)
    niah_single_uuid    essay haystack, the value is a UUID
    niah_multikey       essay haystack, 4 needles with different keys, one is asked for
    niah_multikey_needle  the haystack itself is made of distractor needles (other keys)
    niah_multivalue     essay haystack, 4 values for the asked key, all must be returned
    niah_multiquery     essay haystack, 4 keys asked at once
    vt                  variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... (4 hops)
                        in noise; return every variable holding the value
    cwe                 common words: a numbered word list; return the 10 most common words
    fwe                 frequent words: Zipf-distributed coded words; return the top 3

Lengths are prompt lengths (RULER counts the generated tokens in its max length; we do not).
NIAH/VT prompts hit the target exactly (filler cut at word boundaries, needles at word
boundaries at seeded random depths); CWE/FWE prompts are lists fitted to the longest list that
fits, so they fall short of the target by less than one list item.

Score (RULER's `string_match_all`): the fraction of expected strings found, case-insensitively,
in the generated text; per task and length, the mean × 100.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Sequence

import numpy as np

from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import Runner, as_runner, decode_generated, generate_all, progress
from longmamba_evals.tasks.text import (
    Filler,
    PieceEncoder,
    assemble,
    fit_count,
    load_text,
    nearest_boundary,
)

__all__ = ["TASKS", "RulerPrompt", "make_prompt", "run_ruler", "string_match_all"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_PREFIX = ("Some special magic {tv} are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the {tv} afterwards.\n")
NIAH_SUFFIX = ("\nWhat are all the special magic {tv} for {query} mentioned in the provided "
               "text? The special magic {tv} for {query} mentioned in the provided text are")
NIAH_NEEDLE = " One of the special magic {tv} for {key} is: {value}."
VT_PREFIX = ("Memorize and track the chain(s) of variable assignment hidden in the following "
             "text.\n\n")
VT_SUFFIX = ("\nQuestion: Find all variables that are assigned the value {value} in the text "
             "above. Answer: According to the chain(s) of variable assignment in the text above, "
             "{n} variables are assigned the value {value}, they are: ")
CWE_PREFIX = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.\n")
CWE_SUFFIX = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top "
              "10 words that appear most often in the list are:")
FWE_PREFIX = ("Read the following coded text and track the frequency of each coded word. Find "
              "the three most frequently appeared coded words.")
FWE_SUFFIX = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
              "are the three most frequently appeared words in the above coded text? Answer: "
              "According to the coded text above, the three most frequently appeared words are:")

# name: (kind, settings, tokens to generate)
TASKS: dict[str, tuple[str, dict, int]] = {
    "niah_single_noise": ("niah", dict(haystack="noise", k="words", v="numbers"), 128),
    "niah_single_essay": ("niah", dict(haystack="essay", k="words", v="numbers"), 128),
    "niah_single_uuid": ("niah", dict(haystack="essay", k="words", v="uuids"), 128),
    "niah_multikey": ("niah", dict(haystack="essay", k="words", v="numbers", num_k=4), 128),
    "niah_multikey_needle": ("niah", dict(haystack="needle", k="words", v="numbers"), 128),
    "niah_multivalue": ("niah", dict(haystack="essay", k="words", v="numbers", num_v=4), 128),
    "niah_multiquery": ("niah", dict(haystack="essay", k="words", v="numbers", num_q=4), 128),
    "vt": ("vt", dict(hops=4), 30),
    "cwe": ("cwe", dict(num_cw=10, freq_cw=30, freq_ucw=3), 120),
    "fwe": ("fwe", dict(alpha=2.0, word_len=6), 50),
}
DEFAULT_LENGTHS = (4_000, 8_000, 16_000, 32_000, 64_000, 128_000)


class RulerPrompt:
    """One generated prompt: tokens, the expected strings, and where the needles are."""

    def __init__(self, task: str, tokens: np.ndarray, answers: list[str], target: int,
                 needle_pos: list[int] | None = None, suffix_len: int = 1):
        self.task = task
        self.tokens = tokens
        self.answers = answers
        self.target = target
        self.needle_pos = needle_pos or []
        self.suffix_len = suffix_len


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` contained in `prediction`, case-insensitive (RULER)."""
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


class _Sources:
    """Per-tokenizer text sources shared by all prompts of a run."""

    def __init__(self, tokenizer, text: str):
        self.enc = PieceEncoder(tokenizer)
        self.essay = Filler.from_text(tokenizer, text)
        self.noise = Filler(tokenizer, [NOISE])
        words = {w for w in text.split() if w.isalpha() and w.isascii() and 4 <= len(w) <= 10}
        self.words = sorted(words)
        if len(self.words) < 50:
            raise ValueError("the haystack text needs at least 50 distinct words of 4-10 letters")


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _key_value(rng, kind: str, words: Sequence[str]) -> str:
    if kind == "words":
        return f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"
    if kind == "numbers":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if kind == "uuids":
        return _uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}")


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah(src: _Sources, rng, target, haystack, k, v, num_k=1, num_v=1, num_q=1):
    num_k = max(num_k, num_q)
    keys: list[str] = []
    while len(keys) < num_k:
        key = _key_value(rng, k, src.words)
        if key not in keys:
            keys.append(key)
    values = [[_key_value(rng, v, src.words) for _ in range(num_v)] for _ in keys]
    q = sorted(rng.choice(num_k, size=num_q, replace=False).tolist())
    query = _join_keys([keys[i] for i in q])
    answers = [x for i in q for x in values[i]]
    needles = [src.enc(NIAH_NEEDLE.format(tv=v, key=key, value=val))
               for key, vals in zip(keys, values, strict=True) for val in vals]
    prefix = src.enc(NIAH_PREFIX.format(tv=v))
    suffix = src.enc(NIAH_SUFFIX.format(tv=v, query=query))
    n = target - len(prefix) - len(suffix) - sum(map(len, needles))
    if n < 0:
        raise ValueError(f"length {target} is too short for this RULER prompt "
                         f"({target - n} tokens without haystack)")
    if haystack == "needle":
        # Distractor needles (other keys) make the haystack.
        units: list[str] = []
        while len(units) < n // len(needles[0]) + 2:
            key = _key_value(rng, k, src.words)
            if key not in keys:
                units.append(NIAH_NEEDLE.format(tv=v, key=key,
                                                value=_key_value(rng, v, src.words))[1:])
        filler = Filler(src.enc.tokenizer, units)
        start = 0
    else:
        filler = src.essay if haystack == "essay" else src.noise
        start = int(rng.integers(filler.n_units))
    tokens, bounds = filler.window(n, start)
    at = [nearest_boundary(bounds, d * n) for d in rng.uniform(0, 1, size=len(needles))]
    prompt, pos = assemble(prefix, tokens, list(zip(at, needles, strict=True)), suffix)
    return prompt, answers, pos, len(suffix)


def _vt(src: _Sources, rng, target, hops=4):
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters, size=5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10_000, 100_000)))
    chain = [f" VAR {names[0]} = {value}."]
    chain += [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    needles = [src.enc(c) for c in chain]
    prefix = src.enc(VT_PREFIX)
    suffix = src.enc(VT_SUFFIX.format(value=value, n=hops + 1))
    n = target - len(prefix) - len(suffix) - sum(map(len, needles))
    if n < 0:
        raise ValueError(f"length {target} is too short for the vt prompt")
    tokens, bounds = src.noise.window(n, 0)
    # The chain is inserted in order, at sorted random depths.
    at = sorted(nearest_boundary(bounds, d * n) for d in rng.uniform(0, 1, size=len(needles)))
    prompt, pos = assemble(prefix, tokens, list(zip(at, needles, strict=True)), suffix)
    return prompt, names, pos, len(suffix)


def _cwe(src: _Sources, rng, target, num_cw=10, freq_cw=30, freq_ucw=3):
    pool = rng.permutation(len(src.words))
    common = [src.words[i] for i in pool[:num_cw]]
    others = [src.words[i] for i in pool[num_cw:]]
    order_seed = int(rng.integers(2**31))

    def pieces(n_unc: int, fc: int, fu: int) -> list[str]:
        items = [w for w in common for _ in range(fc)]
        items += [w for w in others[:n_unc] for _ in range(fu)]
        perm = np.random.default_rng(order_seed).permutation(len(items))
        out = [CWE_PREFIX]
        for i, j in enumerate(perm):
            out += [f" {i + 1}.", f" {items[j]}"]
        return out + [CWE_SUFFIX]

    fc, fu = freq_cw, freq_ucw
    if src.enc.length(pieces(0, fc, fu)) > target // 2:
        fc, fu = 2, 1  # RULER's setting for short contexts
    hi = len(others)
    n_unc = fit_count(lambda c: src.enc.length(pieces(min(c, hi), fc, fu)), target, 0, 64)
    if n_unc > hi:
        raise ValueError(f"length {target} needs more distinct words than the text has ({hi})")
    ps = pieces(n_unc, fc, fu)
    return src.enc.join(ps), common, [], len(src.enc(CWE_SUFFIX))


def _zeta(alpha: float) -> float:
    k = np.arange(1, 100_001, dtype=np.float64)
    return float(np.sum(k ** -alpha) + 100_000.0 ** (1 - alpha) / (alpha - 1))


def _fwe(src: _Sources, rng, target, alpha=2.0, word_len=6):
    if alpha <= 1:
        raise ValueError(f"fwe alpha must be > 1, got {alpha}")
    vocab_size = max(10, target // 50)
    vocab: list[str] = []
    letters = np.array(list(string.ascii_lowercase))
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(letters, size=word_len))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "...."  # the most frequent "word" is noise (RULER)
    order_seed = int(rng.integers(2**31))
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    zeta = _zeta(alpha)

    def pieces(num_words: int) -> list[str]:
        counts = (num_words * ranks ** -alpha / zeta).astype(int)
        items = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
        perm = np.random.default_rng(order_seed).permutation(len(items))
        return [FWE_PREFIX] + [f" {items[j]}" for j in perm] + [FWE_SUFFIX]

    num_words = fit_count(lambda c: src.enc.length(pieces(c)), target, 0, 256)
    counts = (num_words * ranks ** -alpha / zeta).astype(int)
    if not counts[1] > counts[2] > counts[3] > counts[4]:
        raise ValueError(f"length {target} is too short for fwe (top-3 counts tie)")
    return src.enc.join(pieces(num_words)), vocab[1:4], [], len(src.enc(FWE_SUFFIX))


_BUILDERS = {"niah": _niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe}


def make_prompt(task: str, tokenizer, length: int, seed: int = 0, *, text: str | None = None,
                sources: _Sources | None = None) -> RulerPrompt:
    """Generates one RULER-style prompt of (about) `length` tokens.

    Args:
        task: a name in `TASKS`.
        tokenizer: has `encode`.
        length: target prompt length in tokens.
        seed: seeds everything random in this prompt.
        text: essay text (default: the bundled LAMBADA excerpt).
        sources: pre-encoded text sources (reused across prompts; built from `text` if None).

    Raises:
        ValueError: on an unknown task or a length too short for the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    kind, kwargs, _ = TASKS[task]
    src = sources or _Sources(tokenizer, load_text(text))
    rng = np.random.default_rng([seed, length, list(TASKS).index(task)])
    tokens, answers, pos, suffix_len = _BUILDERS[kind](src, rng, int(length), **kwargs)
    return RulerPrompt(task, tokens, answers, int(length), pos, suffix_len)


def run_ruler(runner: Runner, tokenizer, method: MethodSpec | None = None, *,
              tasks: Sequence[str] = tuple(TASKS), lengths: Sequence[int] = DEFAULT_LENGTHS,
              num_samples: int = 5, text: str | None = None, seed: int = 0,
              max_new_tokens: int | None = None, batch_size: int = 1,
              show_progress: bool = True) -> dict:
    """Runs the RULER-style tasks for one method.

    Args:
        runner: the model: `longmamba_jax.Params`, an `LMRunner` or any `Runner`.
        tokenizer: the model's tokenizer.
        method: the method (None: vanilla).
        tasks: task names (see `TASKS`).
        lengths: prompt lengths in tokens.
        num_samples: prompts per (task, length).
        text: essay/haystack text (default: bundled LAMBADA excerpt).
        seed: seeds every prompt (the same prompts for every method).
        max_new_tokens: override each task's generation length (RULER: 128/30/120/50).
        batch_size: prompts per generate call (equal-length prompts only).
        show_progress: show a progress bar.

    Returns:
        The result dict: accuracy per task and length (+ the mean over tasks), every sample.
    """
    runner = as_runner(runner, tokenizer)
    method = method or MethodSpec("vanilla")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown RULER task {t!r}; choose from {', '.join(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    lengths = [int(x) for x in lengths]
    src = _Sources(tokenizer, load_text(text))
    eos = getattr(tokenizer, "eos_token_id", None)
    bar = progress(total=len(tasks) * len(lengths) * num_samples,
                   desc=f"ruler/{method.name}", enabled=show_progress)
    samples = []
    for task in tasks:
        gen = int(max_new_tokens or TASKS[task][2])
        for length in lengths:
            prompts = [make_prompt(task, tokenizer, length, seed * 1_000_003 + i, sources=src)
                       for i in range(num_samples)]
            # DeciMamba keeps the question (the suffix after the haystack).
            by_keep: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_keep.setdefault(p.suffix_len, []).append(i)
            outs: list = [None] * len(prompts)
            for keep, idx in by_keep.items():
                method_obj = method.build(runner.n_layer, keep_last=keep)
                res = generate_all(runner, [prompts[i].tokens for i in idx], gen, method_obj,
                                   batch_size=batch_size, bar=bar)
                for i, r in zip(idx, res, strict=True):
                    outs[i] = r
            for i, (p, ids) in enumerate(zip(prompts, outs, strict=True)):
                text_out = decode_generated(tokenizer, ids, eos)
                samples.append({
                    "task": task, "length": length, "sample": i,
                    "prompt_len": int(len(p.tokens)), "needle_pos": p.needle_pos,
                    "expected": p.answers, "produced": text_out,
                    "score": string_match_all(text_out, p.answers),
                })
    bar.close()
    return _summarize(samples, list(tasks), lengths, method, tokenizer, seed, num_samples)


def _summarize(samples, tasks, lengths, method, tokenizer, seed, num_samples) -> dict:
    def acc(rows):
        return 100.0 * float(np.mean([r["score"] for r in rows])) if rows else float("nan")

    curves, rows = {}, []
    for t in tasks:
        ys = [acc([s for s in samples if s["task"] == t and s["length"] == ln]) for ln in lengths]
        curves[t] = {"x": lengths, "y": ys}
        rows.append([t] + ys)
    mean = [float(np.mean([curves[t]["y"][j] for t in tasks])) for j in range(len(lengths))]
    curves = {"mean": {"x": lengths, "y": mean}, **curves}
    rows.append(["mean"] + mean)
    return {
        "task": "ruler",
        "method": method.name,
        "metric": "accuracy (%)",
        "settings": {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                     "tasks": tasks, "lengths": lengths, "num_samples": num_samples,
                     "seed": seed, **method.settings()},
        "curves": curves,
        "table": {"columns": ["task"] + [str(x) for x in lengths], "rows": rows},
        "samples": samples,
    }
