"""Host side of generation: streaming and stop strings (docs/generation.md, "Streaming").

The jitted loop runs in slices of `sync_every` steps (`decode_run` resumes from the state the
previous slice returned: same program every time). After each slice the host copies the token
buffer int32 [b, n] once, ends the rows whose decoded text now contains a stop string, and hands
the new token columns int32 [b] to the caller in order:

    state = start();  loop: tokens = host(state.tokens); stop strings; yield columns;
                            state = run(state, stop_at = i + sync_every)

A stop string ends its row at the first generated token t whose text decode(ids[:t + 1])
contains it: that token is kept, later ones become the pad id, and the row's length is t + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np


class StopStrings:
    """Finds where a row's decoded text first contains one of `strings`.

    Cost per check: one `tokenizer.decode` of the row's generated ids (and, only for the row
    that matched, one decode per token of the last slice to find the exact token).
    """

    def __init__(self, strings: Sequence[str], tokenizer):
        if isinstance(strings, str):
            strings = [strings]
        strings = list(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got "
                             f"{strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings need tokenizer= (anything with decode(ids) -> str) "
                             "to read the generated text")
        self.strings = strings
        self.tokenizer = tokenizer

    def _hit(self, ids) -> bool:
        text = self.tokenizer.decode([int(t) for t in ids])
        return any(s in text for s in self.strings)

    def first_stop(self, ids: np.ndarray, start: int) -> int | None:
        """The smallest t ≥ start with a stop string in decode(ids[:t + 1]), or None.
        decode(ids[:start]) is known to hold none."""
        if len(ids) <= start or not self._hit(ids):
            return None
        for t in range(start, len(ids)):
            if self._hit(ids[: t + 1]):
                return t
        return len(ids) - 1  # decode is not prefix-monotonic (e.g. bytes completing a char)


def _apply_stops(state, tokens: np.ndarray, checked: np.ndarray, stops: StopStrings, pad_id: int):
    """Ends the rows whose new tokens complete a stop string; returns (state, tokens)."""
    lengths = np.array(state.lengths)
    done = np.array(state.done)
    hits = []
    for r in range(tokens.shape[0]):
        n_r = int(lengths[r])
        if n_r > checked[r]:
            t = stops.first_stop(tokens[r, :n_r], int(checked[r]))
            if t is not None:
                hits.append((r, t))
                tokens[r, t + 1:] = pad_id
                lengths[r], done[r] = t + 1, True
        checked[r] = max(int(checked[r]), int(lengths[r]))
    if not hits:
        return state, tokens
    state = state._replace(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                           done=jnp.asarray(done))
    if state.logprobs is not None:
        logprobs = np.array(state.logprobs)
        for r, t in hits:
            logprobs[r, t + 1:] = 0.0
        state = state._replace(logprobs=jnp.asarray(logprobs))
    return state, tokens


def host_loop(state, advance: Callable, *, limit: int, sync_every: int,
              stops: StopStrings | None, pad_id: int) -> Iterator[np.ndarray]:
    """Generator over the token columns int32 [b] in order; its return value (StopIteration.value)
    is the final state. `advance(state, stop_at)` runs the loop on to stop_at tokens."""
    emitted = 0
    checked = np.zeros(int(state.tok.shape[0]), np.int64)
    while True:
        i = int(state.i)
        tokens = np.array(state.tokens)  # one copy of [b, n] per slice
        if stops is not None:
            state, tokens = _apply_stops(state, tokens, checked, stops, pad_id)
        finished = bool(np.all(np.asarray(state.done)))
        end = min(i, int(np.max(np.asarray(state.lengths)))) if finished else i
        for t in range(emitted, end):  # no all-pad columns after the last row's end
            yield tokens[:, t]
        emitted = end
        if i >= limit or finished:
            return state
        state = advance(state, min(i + sync_every, limit))


def as_callback(streamer) -> tuple[Callable, Callable | None, bool]:
    """(put(column), end() or None, wants_prompt) for a callable or a transformers-style
    streamer object (`put(ids)` / `end()`, first called with the prompt ids)."""
    if hasattr(streamer, "put") and hasattr(streamer, "end"):
        return streamer.put, streamer.end, True
    if callable(streamer):
        return streamer, None, False
    raise TypeError(f"streamer must be a callable or have put()/end() (transformers' "
                    f"BaseStreamer), got {type(streamer).__name__}")
