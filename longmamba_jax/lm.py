"""Text in, text out: weights, tokenizer, an optional LongMamba calibration and a default method
in one object (docs/generation.md, "LanguageModel").

    lm = lmj.LanguageModel.from_pretrained("state-spaces/mamba2-1.3b")   # or a directory
    lm.generate("The capital of France is", max_new_tokens=20)           # -> str
    lm.generate(["one prompt", "another"], max_new_tokens=20)            # -> list[str]
    for piece in lm.stream("Once upon a time", max_new_tokens=50): print(piece, end="")
    logits = lm(tokens)                                                  # [b, l, V]
    lmj.LanguageModel.demo()                                             # the bundled model
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longmamba_jax.model_spec import parse_model_spec
from longmamba_jax.tokenizer import HFTokenizer, load_tokenizer

__all__ = ["LanguageModel"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# mamba_ssm's own checkpoints (state-spaces/mamba-*, mamba2-*) ship no tokenizer; their README
# uses this one (vocabulary 50,277, padded to 50,280 in the model).
NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
CALIBRATION_FILE = "calibration.npz"
BUCKET = 64  # prompts are left-padded to a multiple of this when that is exact (see _bucket)
_DEFAULT = object()


class LanguageModel:
    """A model with its tokenizer: `generate(str) -> str`, `lm(tokens) -> logits`.

    Attributes:
      params: `Params`.  tokenizer: `encode(str) -> list[int]`, `decode(ids) -> str`.
      calibration: a LongMamba `Calibration`, or None.
      method: the default method: None (vanilla), `LongMamba(calibration)` or a method object.
      backend: the scan backend name used by default.
    """

    def __init__(self, params, tokenizer, *, calibration=None, method: Any = "auto",
                 backend: str = "auto"):
        """Args:
          params: `Params`.
          tokenizer: "bytes", a tokenizer directory / cached hub id, or a tokenizer object.
          calibration: a `Calibration`, a path to one (.npz), or None.
          method: "auto" (LongMamba when calibrated, else vanilla), "vanilla", "longmamba",
            or a method object (`LongMamba(...)`, `DeciMamba(...)`).
          backend: scan backend name ("auto", "reference", "pallas", ...).
        """
        from longmamba_jax.model import Params

        if not isinstance(params, Params):
            raise TypeError(f"params must be longmamba_jax.Params, got {type(params).__name__}")
        self.params = params
        self.tokenizer = _as_tokenizer(tokenizer)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and vocab > params.config.padded_vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer!r} has {vocab} ids but the model only "
                             f"{params.config.padded_vocab_size}: not this model's tokenizer")
        self.calibration = _as_calibration(calibration, params)
        self.method = self._method(method)
        self.backend = backend

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pretrained(cls, model, *, tokenizer=None, calibration=None, method: Any = "auto",
                        dtype=None, revision: str | None = None, backend: str = "auto",
                        seed: int = 0) -> LanguageModel:
        """Loads a model and its tokenizer (and calibration, when there is one).

        Args:
          model: a checkpoint directory or hub id (anything `longmamba_jax.load` takes), a
            converted directory, "demo" (the bundled model) or "tiny-random:mamba1|mamba2".
          tokenizer: None finds it: the tokenizer files in the checkpoint directory; the byte
            tokenizer for the demo and tiny-random models; gpt-neox-20b for mamba_ssm's own
            checkpoints, which ship none. Or "bytes", a directory / hub id, or an object.
          calibration: a `Calibration` or a path; default: `calibration.npz` in the checkpoint
            directory (and the demo's own), if present.
          method: see `__init__`.
          dtype: None keeps the stored dtype; e.g. jnp.float32 casts.
          revision: hub revision.
          seed: init seed of a tiny random model.
        """
        spec = parse_model_spec(model)
        if spec.kind == "checkpoint" and _is_demo_layout(Path(spec.source)):
            return cls._from_demo_dir(Path(spec.source), tokenizer, calibration, method, dtype,
                                      backend)
        if spec.kind == "demo":
            return cls._from_demo_dir(None, tokenizer, calibration, method, dtype, backend)
        if spec.kind == "tiny-random":
            tok = _as_tokenizer("bytes" if tokenizer is None else tokenizer)
            params = spec.load(vocab_size=tok.vocab_size, seed=seed, dtype=dtype)
            return cls(params, tok, calibration=calibration, method=method, backend=backend)
        from longmamba_jax.checkpoints import load, resolve_source

        directory = resolve_source(spec.source, revision=revision)
        params = load(directory, dtype=dtype)
        if tokenizer is None:
            tokenizer = _find_tokenizer(directory)
        if calibration is None and (directory / CALIBRATION_FILE).is_file():
            calibration = directory / CALIBRATION_FILE
        return cls(params, tokenizer, calibration=calibration, method=method, backend=backend)

    @classmethod
    def demo(cls, **kwargs) -> LanguageModel:
        """The bundled byte-level Mamba2 with its calibration (LongMamba by default)."""
        return cls.from_pretrained("demo", **kwargs)

    @classmethod
    def _from_demo_dir(cls, root, tokenizer, calibration, method, dtype, backend):
        from longmamba_jax.demo import demo_model

        demo = demo_model(root)
        params = demo.params if dtype is None else demo.params.astype(dtype)
        return cls(params, demo.tokenizer if tokenizer is None else tokenizer,
                   calibration=demo.calibration if calibration is None else calibration,
                   method=method, backend=backend)

    # ------------------------------------------------------------------------------------------
    # Use

    @property
    def config(self):
        """The model's `MambaConfig` / `Mamba2Config`."""
        return self.params.config

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of token ids (special tokens skipped)."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __call__(self, tokens, *, method: Any = _DEFAULT, last_n: int | None = None):
        """Logits fp32 [b, l, V] of int [b, l] tokens ([l, V] for int [l] or a str)."""
        from longmamba_jax.model import forward

        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        tokens = np.asarray(tokens)
        single = tokens.ndim == 1
        logits = forward(self.params, tokens[None] if single else tokens,
                         method=self._method(method, default=self.method),
                         backend=self.backend, last_n=last_n)
        return logits[0] if single else logits

    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None,
                 stop_strings: str | list[str] | None = None, eos_token_id: Any = _DEFAULT,
                 seed: int | None = None, key=None, method: Any = _DEFAULT,
                 streamer=None) -> str | list[str]:
        """Continues `prompt` (a str, or a list of str generated as one batch).

        Options as `longmamba_jax.generate`; eos_token_id defaults to the tokenizer's (None:
        never stop early); method defaults to this model's. `streamer`, for one prompt, is
        called with each new piece of text.

        Returns:
          The generated text (without the prompt), or a list of them for a list of prompts.
        """
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repetition_penalty, stop_strings=stop_strings,
                       eos_token_id=eos_token_id, seed=seed, key=key, method=method)
        if streamer is not None:
            if not isinstance(prompt, str):
                raise ValueError("streamer= takes one prompt (a str); use stream() per prompt")
            pieces = []
            for piece in self.stream(prompt, max_new_tokens, **options):
                streamer(piece)
                pieces.append(piece)
            return "".join(pieces)
        from longmamba_jax.generation.generate import generate

        texts = [prompt] if isinstance(prompt, str) else _check_texts(prompt)
        ids = [self.encode(t) for t in texts]
        rows = generate(self.params, ids, max_new_tokens=max_new_tokens,  # a list: rows out
                        **self._options(options, ids))
        out = [self.decode(r) for r in _cut(rows, self._eos(eos_token_id))]
        return out[0] if isinstance(prompt, str) else out

    def stream(self, prompt: str, max_new_tokens: int = 64, **options) -> Iterator[str]:
        """Yields the text of `prompt`'s continuation piece by piece, as tokens are produced
        (options as `generate`). A piece is held back while it ends inside a UTF-8 character."""
        from longmamba_jax.generation.generate import stream_generate

        if not isinstance(prompt, str):
            raise ValueError(f"stream() takes one prompt (a str), got {type(prompt).__name__}")
        ids = self.encode(prompt)
        eos = set(self._eos(options.get("eos_token_id", _DEFAULT)))
        tokens = stream_generate(self.params, ids, max_new_tokens=max_new_tokens,
                                 **self._options(options, [ids]))
        return self._text_pieces(tokens, eos)

    def _text_pieces(self, tokens, eos) -> Iterator[str]:
        ids: list[int] = []
        shown = ""
        for t in tokens:
            if t in eos:
                break
            ids.append(int(t))
            text = self.decode(ids)
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue  # an unfinished character (or a re-segmentation): wait
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self.decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]

    def __repr__(self) -> str:
        return (f"LanguageModel({self.params!r}, tokenizer={self.tokenizer!r}, "
                f"method={_method_name(self.method)})")

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _method(self, method, default: Any = "auto"):
        from longmamba_jax.methods import LongMamba

        if method is _DEFAULT:
            return default
        if method == "auto":
            return None if self.calibration is None else LongMamba(self.calibration)
        if method is None or method == "vanilla":
            return None
        if method == "longmamba":
            if self.calibration is None:
                raise ValueError("method 'longmamba' needs a calibration (calibration= a "
                                 "Calibration or its .npz file; see longmamba-calibrate)")
            return LongMamba(self.calibration)
        if isinstance(method, str) or not hasattr(method, "model_kwargs"):
            raise ValueError(f"method must be 'auto', 'vanilla', 'longmamba' or a method object "
                             f"(LongMamba / DeciMamba), got {method!r}")
        return method

    def _eos(self, eos_token_id) -> list[int]:
        if eos_token_id is _DEFAULT:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            # a tokenizer's EOS the model cannot emit (the byte tokenizer's 256 on a 256-id
            # model) never ends a row
            return [int(eos)] if eos is not None and 0 <= eos < self.config.vocab_size else []
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else \
            [int(i) for i in eos_token_id]

    def _options(self, options: dict, ids: list[list[int]]) -> dict:
        """generate()'s keyword arguments: defaults filled, and the prompt bucket."""
        options = dict(options)
        method = self._method(options.pop("method", _DEFAULT), default=self.method)
        eos = self._eos(options.pop("eos_token_id", _DEFAULT))
        if options.get("stop_strings") is not None:
            options["tokenizer"] = self.tokenizer
        return dict(options, method=method, eos_token_id=eos or None, backend=self.backend,
                    pad_to_multiple_of=_bucket(method, max((len(i) for i in ids), default=0)))


def _bucket(method, width: int) -> int | None:
    """BUCKET when left-padding the prompts to a multiple of it changes nothing but the compiled
    shape (vanilla, or LongMamba still off at the padded length), else None."""
    from longmamba_jax.methods import LongMamba

    padded = -(-width // BUCKET) * BUCKET
    if method is None or (isinstance(method, LongMamba) and not method.active(padded)):
        return BUCKET
    return None


def _cut(rows, eos: list[int]) -> list[np.ndarray]:
    """Rows cut before their first EOS id (the text of a row ends there)."""
    out = []
    for r in rows:
        r = np.asarray(r)
        hits = np.flatnonzero(np.isin(r, eos)) if eos else []
        out.append(r[: hits[0]] if len(hits) else r)
    return out


def _check_texts(prompts) -> list[str]:
    if not isinstance(prompts, (list, tuple)) or not prompts or \
            not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompts!r:.80}")
    return list(prompts)


def _method_name(method) -> str:
    if method is None:
        return "vanilla"
    cal = getattr(method, "calibration", None)
    if cal is not None:
        return f"{type(method).__name__}(train_len={cal.train_len})"
    return repr(method)


def _is_demo_layout(root: Path) -> bool:
    return (root / "model" / "config.json").is_file() and (root / CALIBRATION_FILE).is_file() \
        and not (root / "config.json").exists()


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(os.fspath(tokenizer))
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # a transformers tokenizer
        return HFTokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or "transformers")
    if callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode",
                                                                         None)):
        return tokenizer
    raise ValueError(f"tokenizer must be 'bytes', a tokenizer directory / hub id or an object "
                     f"with encode/decode, got {tokenizer!r}")


def _find_tokenizer(directory: Path):
    """The tokenizer of a checkpoint directory (see `LanguageModel.from_pretrained`)."""
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(str(directory))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "ssm_cfg" in config and config.get("vocab_size") in (50277, 50280):
        from transformers import AutoTokenizer  # may download it, as `load` did the weights

        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(NEOX_TOKENIZER), NEOX_TOKENIZER)
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: no tokenizer files, and {NEOX_TOKENIZER} (the "
                             f"tokenizer of mamba_ssm's checkpoints) could not be loaded: {e}. "
                             "Pass tokenizer= a tokenizer directory.") from e
    raise ValueError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                     "tokenizer='bytes' for a byte-level model, or a tokenizer directory / "
                     "hub id")


def _as_calibration(calibration, params):
    if calibration is None:
        return None
    from longmamba_jax.calibration import Calibration

    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be a Calibration or a path to its .npz, got "
                         f"{type(calibration).__name__}")
    cfg = params.config
    n = cfg.n_ssm_layer  # a hybrid model's calibration covers its Mamba2 layers only
    calibration.check_compatible(cfg.fingerprint, n, [cfg.channels] * n)
    return calibration
