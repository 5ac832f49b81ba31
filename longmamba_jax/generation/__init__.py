"""Generation: prefill, the recurrent decode step, the jitted decode loop, sampling, streaming
and chunked prefill of prompts of any length."""

from longmamba_jax.generation.chunked import prefill_chunked
from longmamba_jax.generation.generate import (
    GenerateOutput,
    decode_step,
    generate,
    prefill,
    stream_generate,
)

__all__ = ["GenerateOutput", "decode_step", "generate", "prefill", "prefill_chunked",
           "stream_generate"]
