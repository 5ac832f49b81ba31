"""longmamba_jax.prompts: the passkey format shared by the evaluations and the demo, checked on
hand-built byte strings."""

from __future__ import annotations

import numpy as np
import pytest

from longmamba_jax.prompts import (
    INSTRUCTION,
    Filler,
    assemble,
    make_passkey_prompt,
    nearest_boundary,
    parse_answer,
)
from longmamba_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _text(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8")


def test_filler_window_by_hand():
    f = Filler.from_text(TOK, "ab cde f")  # " ab cde f": units start at 0, 3, 7
    tokens, bounds = f.window(12, start_unit=1)  # from " cde": " cde f ab cd"
    assert _text(tokens) == " cde f ab cd"
    assert bounds.tolist() == [0, 4, 6, 9, 12]


def test_nearest_boundary_and_assemble_by_hand():
    assert nearest_boundary(np.array([0, 4, 6, 12]), 5.0) == 4  # tie: the earlier one
    assert nearest_boundary(np.array([0, 4, 6, 12]), 8.9) == 6  # 2.9 < 3.1
    out, pos = assemble([1, 2], np.array([10, 11, 12]), [(3, [8]), (1, [7, 7])], [9])
    assert out.tolist() == [1, 2, 10, 7, 7, 11, 12, 8, 9]
    assert pos == [7, 3]
    with pytest.raises(ValueError, match="outside the filler"):
        assemble([], np.array([1]), [(2, [5])], [])


def test_passkey_prompt_by_hand():
    filler = Filler.from_text(TOK, "one two three four")
    needle = " The pass key is 12345. Remember it. 12345 is the pass key."
    question = " What is the pass key? The pass key is"
    n = 14  # " one two three four" cut to 14 bytes: " one two three"
    length = len(INSTRUCTION) + len(needle) + len(question) + n
    p = make_passkey_prompt(TOK, filler, length, 0.5, "12345")
    # depth 0.5 of 14 = 7: boundaries 0, 4, 8, 14 -> 8 (|8-7| = 1 < |4-7| = 3)
    assert _text(p.tokens) == INSTRUCTION + " one two" + needle + " three" + question
    assert (p.needle_pos, p.needle_len, p.filler_len, p.filler_before) == (
        len(INSTRUCTION) + 8, len(needle), 14, 8)
    assert p.question_len == len(question)


def test_passkey_prompt_errors():
    filler = Filler.from_text(TOK, "word " * 100)
    with pytest.raises(ValueError, match="5 digits"):
        make_passkey_prompt(TOK, filler, 1000, 0.5, "1234")
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(TOK, filler, 100, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        make_passkey_prompt(TOK, filler, 1000, -0.1, "12345")
    with pytest.raises(ValueError, match="at least one"):
        Filler.from_text(TOK, "   ")


def test_parse_answer():
    assert parse_answer(" 1234567 and 9") == "12345"
    assert parse_answer(" 42.") == "42"
    assert parse_answer(" none") == ""
