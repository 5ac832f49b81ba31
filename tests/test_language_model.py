"""LanguageModel (text in, text out) on the bundled demo model and on a tiny model exported to a
directory with a byte-level BPE tokenizer built here; stop strings against transformers'
`StopStringCriteria`; model specs; the `longmamba-generate` command in-process.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.generation.stopping_criteria import StopStringCriteria

import longmamba_jax as lmj
from longmamba_jax.__main__ import main as module_main
from longmamba_jax.demo import DEMO_DIR
from longmamba_jax.generation.cli import main as cli_main
from longmamba_jax.model_spec import ModelSpec, parse_model_spec
from longmamba_jax.tokenizer import ByteTokenizer, HFTokenizer

N = 12
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("a", "t")]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: the 256 byte symbols, a few merges ("the", " cat", ...) and an EOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|eos|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory, params, transformers tokenizer): a tiny Mamba2 exported in the transformers
    layout with its tokenizer files beside it, as a hub checkpoint comes."""
    hf = make_tokenizer()
    # no vocabulary padding: the transformers layout stores the padded size as the vocabulary
    config = lmj.Mamba2Config.tiny(vocab_size=len(hf), tie_embeddings=False,
                                   pad_vocab_size_multiple=1)
    p = jax.jit(lmj.init_params, static_argnums=(0, 1))(config, 1)  # one compile, not many
    # a head that favours printable ASCII tokens (their logits random, the others' 0), so the
    # continuation is text that stop strings can be cut from
    printable = [bool(t) and t.isascii() and t.isprintable()
                 for t in (hf.decode([v]) for v in range(len(hf)))]
    head = p.weights["lm_head"]["kernel"] * 40 * np.asarray(printable, np.float32)
    params = lmj.Params({**p.weights, "lm_head": {"kernel": head}}, p.config)
    directory = lmj.export_torch(params, tmp_path_factory.mktemp("export") / "model")
    hf.save_pretrained(directory)
    return directory, params, hf


@pytest.fixture
def restore_compile_cache_flag():
    before = jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_enable_compilation_cache", before)


# ----------------------------------------------------------------------------------------------
# The demo model


def test_demo_language_model():
    lm = lmj.LanguageModel.demo()
    assert isinstance(lm.tokenizer, ByteTokenizer) and isinstance(lm.method, lmj.LongMamba)
    r = repr(lm)
    assert len(r) < 300 and "LongMamba(train_len=512)" in r and "5.8M params" in r
    assert repr(lmj.LanguageModel.from_pretrained(DEMO_DIR)) == r  # the directory, the same
    text = "There is an important info hidden inside a lot of irrelevant text."
    out = lm.generate(text, max_new_tokens=8)
    # The same through the array API, unpadded (lm pads the prompt to 64 tokens, masked):
    ids = np.asarray(lm.encode(text), np.int32)
    ref = np.asarray(lmj.generate(lm.params, ids, max_new_tokens=8, eos_token_id=256,
                                  method=lm.method))
    ref = ref[: list(ref).index(256)] if 256 in ref else ref
    assert isinstance(out, str) and out == lm.decode(ref)
    with pytest.raises(ValueError, match="calibration"):
        lmj.LanguageModel(lm.params, "bytes", method="longmamba")
    with pytest.raises(ValueError, match="method"):
        lmj.LanguageModel(lm.params, "bytes", method="fast")


# ----------------------------------------------------------------------------------------------
# A checkpoint directory with tokenizer files


def test_exported_model_with_its_tokenizer(exported):
    directory, params, hf = exported
    lm = lmj.LanguageModel.from_pretrained(directory)
    assert isinstance(lm.tokenizer, HFTokenizer) and lm.method is None
    assert lm.config == params.config
    assert lm.tokenizer.encode(" cat the") == hf.encode(" cat the") and len(hf.encode(" cat")) == 1
    prompts = ["the cat", "a"]
    batch = lm.generate(prompts, max_new_tokens=N)
    alone = [lm.generate(p, max_new_tokens=N) for p in prompts]
    assert batch == alone and all(isinstance(t, str) for t in batch)
    ids = hf.encode("the cat")
    tokens = np.asarray(lmj.generate(params, ids, max_new_tokens=N, eos_token_id=hf.eos_token_id))
    stop = list(tokens).index(hf.eos_token_id) if hf.eos_token_id in tokens else N
    assert alone[0] == hf.decode(tokens[:stop])
    assert "".join(lm.stream("the cat", max_new_tokens=N)) == alone[0]
    pieces = []
    assert lm.generate("the cat", max_new_tokens=N, streamer=pieces.append) == alone[0]
    assert "".join(pieces) == alone[0]
    logits = lm(ids)  # 1-D in: [l, V]
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(lmj.forward(params, np.asarray(ids)[None]))[0],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lm("the cat")), np.asarray(logits))


def test_stop_strings_match_transformers_criteria(exported):
    """Our stop == the first step at which transformers' StopStringCriteria fires on the
    generated ids (a stop string spanning token boundaries, partial tokens at either end)."""
    directory, params, hf = exported
    lm = lmj.LanguageModel.from_pretrained(directory)
    ids = hf.encode("the cat")
    free = np.array(lmj.generate(params, ids, max_new_tokens=N))  # a writable copy
    stop = None
    for t in range(3, N):
        text, before = hf.decode(free[: t + 1]), hf.decode(free[:t])
        cand = text[-3:]
        if cand not in before and hf.decode(free[t:t + 1]) != cand:
            stop = cand  # first completed by token t, and not token t alone
            break
    assert stop is not None, "no usable stop string in the continuation"
    criteria = StopStringCriteria(tokenizer=hf, stop_strings=[stop])
    fired = [bool(criteria(torch.as_tensor(free[None, : k + 1]), None)[0]) for k in range(N)]
    t_hf = fired.index(True)
    rows = lmj.generate(params, [ids], max_new_tokens=N, stop_strings=stop, tokenizer=lm.tokenizer)
    assert len(rows[0]) == t_hf + 1
    np.testing.assert_array_equal(rows[0], free[: t_hf + 1])
    assert lm.generate("the cat", max_new_tokens=N, stop_strings=[stop], eos_token_id=None) \
        == hf.decode(free[: t_hf + 1])


# ----------------------------------------------------------------------------------------------
# Model specs and the command line


def test_model_specs():
    assert parse_model_spec("demo") == ModelSpec("demo")
    assert parse_model_spec("tiny-random:mamba1") == ModelSpec("tiny-random", "mamba1")
    assert parse_model_spec(" state-spaces/mamba2-130m ") == ModelSpec(
        "checkpoint", "state-spaces/mamba2-130m")
    assert str(parse_model_spec("tiny-random:mamba2")) == "tiny-random:mamba2"
    for bad in ("tiny-random:mamba3", "", None):
        with pytest.raises(ValueError, match="tiny-random|model"):
            parse_model_spec(bad)
    shapes = jax.eval_shape(lambda: parse_model_spec("tiny-random:mamba1").load(vocab_size=100))
    assert shapes.config == lmj.MambaConfig.tiny(vocab_size=100)
    assert shapes.weights["embedding"]["weight"].shape == (104, 16)  # padded to a multiple of 8


def test_cli_generates_what_language_model_does(exported, capsys, restore_compile_cache_flag):
    directory, _, _ = exported
    want = lmj.LanguageModel.from_pretrained(directory).generate("the cat", max_new_tokens=N)
    base = ["--model", str(directory), "--prompt", "the cat", "--max-new-tokens", str(N),
            "--no-compile-cache"]
    for extra in ([], ["--no-stream"]):
        assert cli_main(base + extra) == 0
        assert capsys.readouterr().out == want + "\n"
    assert module_main(["generate"] + base + ["--method", "longmamba"]) == 2
    assert "needs a calibration" in capsys.readouterr().err
    assert cli_main(["--model", str(directory / "missing"), "--prompt", "x",
                     "--no-compile-cache"]) == 2
    assert "longmamba-generate: error:" in capsys.readouterr().err


def test_cli_quantize_generates_what_the_quantized_model_does(exported, capsys, monkeypatch,
                                                               restore_compile_cache_flag):
    """`--quantize int8` generates with `quantize`d params what `LanguageModel` does."""
    from longmamba_jax import quantization

    directory, _, _ = exported
    lm = lmj.LanguageModel.from_pretrained(directory)
    lm.params = lmj.quantize(lm.params)
    want = lm.generate("the cat", max_new_tokens=N)
    generated_with = []
    real = lmj.LanguageModel.generate
    monkeypatch.setattr(lmj.LanguageModel, "generate", lambda self, *a, **k: (
        generated_with.append(quantization.is_quantized(self.params)) or real(self, *a, **k)))
    assert cli_main(["--model", str(directory), "--prompt", "the cat", "--max-new-tokens",
                     str(N), "--no-stream", "--quantize", "int8", "--no-compile-cache"]) == 0
    assert generated_with == [True]
    assert capsys.readouterr().out == want + "\n"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: longmamba-generate") and "--no-compile-cache" in out
    with pytest.raises(SystemExit):
        module_main(["generate", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m longmamba_jax generate")
    assert module_main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert module_main(["nope"]) == 2
