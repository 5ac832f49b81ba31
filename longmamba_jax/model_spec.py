"""Model specs as the command lines take them (`--model SPEC`), parsed in one place.

    demo                      the bundled byte-level demo model (with its calibration)
    tiny-random:FAMILY        a tiny random model (`config.tiny_config(FAMILY)`: mamba1, mamba2,
                              falcon_mamba, zamba2, bamba), to try the mechanics; nothing loaded
    anything else             a checkpoint directory or a hub id, as `longmamba_jax.load`
                              (a directory named "demo": pass "./demo")

    spec = parse_model_spec("tiny-random:mamba2")
    params = spec.load(vocab_size=tokenizer.vocab_size)
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["TINY_RANDOM", "ModelSpec", "parse_model_spec"]

TINY_RANDOM = ("mamba1", "mamba2", "falcon_mamba", "zamba2", "bamba")
_TINY_HELP = "tiny-random:" + "|".join(TINY_RANDOM)
_BYTE_VOCAB = 257  # ByteTokenizer: 256 bytes + EOS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` value.

    Attributes:
      kind: "demo", "tiny-random" or "checkpoint".
      source: the family for tiny-random (one of TINY_RANDOM), the directory or hub id
        for a checkpoint, "" for the demo.
    """

    kind: str
    source: str = ""

    def load(self, *, vocab_size: int | None = None, seed: int = 0, dtype=None,
             revision: str | None = None):
        """The `Params` this spec names.

        Args:
          vocab_size: the vocabulary of a tiny random model (default 257, the byte tokenizer's);
            ignored for the other kinds.
          seed: init seed of a tiny random model.
          dtype: None keeps the stored dtype (float32 for a tiny random model).
          revision: hub revision of a checkpoint.
        """
        import longmamba_jax as lmj

        if self.kind == "tiny-random":
            import jax
            import jax.numpy as jnp

            from longmamba_jax.config import tiny_config

            config = tiny_config(self.source, vocab_size=int(vocab_size or _BYTE_VOCAB))
            # jitted: one program (kept by the compile cache) instead of many eager ops; equal
            # to init_params up to float rounding
            init = jax.jit(lmj.init_params, static_argnums=(0, 1, 2))
            return init(config, int(seed), jnp.float32 if dtype is None else dtype)
        if self.kind == "demo":
            params = lmj.demo_model().params
            return params if dtype is None else params.astype(dtype)
        return lmj.load(self.source, dtype=dtype, revision=revision)

    def __str__(self) -> str:
        return {"demo": "demo", "tiny-random": f"tiny-random:{self.source}"}.get(self.kind,
                                                                                self.source)


def parse_model_spec(spec) -> ModelSpec:
    """Parses a `--model` value (see the module docstring).

    Raises:
      ValueError: an empty spec, or tiny-random with an unknown architecture.
    """
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, os.PathLike):  # a path is always a checkpoint directory
        return ModelSpec("checkpoint", os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model must be a directory, a hub id, 'demo' or "
                         f"'{_TINY_HELP}', got {spec!r}")
    spec = spec.strip()
    if spec == "demo":
        return ModelSpec("demo")
    if spec.startswith("tiny-random:"):
        arch = spec.split(":", 1)[1]
        if arch not in TINY_RANDOM:
            raise ValueError(f"bad model {spec!r}: use {_TINY_HELP}")
        return ModelSpec("tiny-random", arch)
    return ModelSpec("checkpoint", spec)
