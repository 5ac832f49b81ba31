"""The evaluation suite: prompt mechanics, scoring, outputs, each task end to end, the CLI.

Mechanics are checked with fake runners (an oracle that reads the prompt, a runner that echoes
it, fixed answers); each task also runs end to end on a tiny random model on CPU.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import longmamba_jax as lm
from longmamba_evals.tasks import latency, longbench, outputs, passkey, perplexity, ruler
from longmamba_evals.tasks.lengths import parse_lengths
from longmamba_evals.tasks.methods import MethodSpec
from longmamba_evals.tasks.runner import LMRunner
from longmamba_evals.tasks.text import Filler, load_text
from longmamba_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


# ----------------------------------------------------------------------------------------------
# Fakes


class FakeRunner:
    """Generates `answer(prompt_text)`; logits from `logits_fn`."""

    n_layer = 2
    vocab_size = 257

    def __init__(self, answer=lambda text: " 00000", logits_fn=None, truncate=True):
        self.answer = answer
        self.truncate = truncate
        self.logits_fn = logits_fn
        self.calls = []

    def generate(self, tokens, max_new_tokens, method):
        self.calls.append((tokens.shape, max_new_tokens, method))
        out = []
        for row in tokens:
            ids = TOK.encode(self.answer(TOK.decode(row)))
            if self.truncate:
                ids = ids[:max_new_tokens]
            out.append(ids + [TOK.EOS_ID] * max(0, max_new_tokens - len(ids)))
        return np.asarray(out)

    def logits(self, tokens, last_n, method):
        return self.logits_fn(tokens, last_n)


def oracle_passkey(text):
    return " " + re.search(r"The pass key is (\d{5})", text).group(1) + ". Remember"


@pytest.fixture(scope="module")
def filler():
    return Filler.from_text(TOK, load_text())


@pytest.fixture(scope="module")
def tiny_params():
    return lm.init_params(lm.Mamba2Config.tiny(vocab_size=TOK.vocab_size), seed=0)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_byte_tokenizer_roundtrip_and_specials():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_token_id == 256
    text = "pass key 12345, naïve ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [256, 300, 5000]) == text  # non-byte ids are skipped
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # truncated UTF-8 is replaced
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")


def test_hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "the": 2, "pass": 3, "key": 4, "is": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]",
                            eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 1 and tok.vocab_size == 6
    assert tok.encode("the pass key is") == [2, 3, 4, 5]  # no special tokens added
    assert tok.decode([2, 3, 1, 99]) == "the pass"  # specials and out-of-vocab ids skipped
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        load_tokenizer("")


# ----------------------------------------------------------------------------------------------
# Common pieces


def test_parse_lengths():
    assert parse_lengths("1k,2K,4096,1.5k,1m") == [1000, 2000, 4096, 1500, 1_000_000]
    assert parse_lengths([300, "2k"]) == [300, 2000]
    for bad in ["", "4kb", "0", "1.0005k", "-3"]:
        with pytest.raises(ValueError):
            parse_lengths(bad)


def test_filler_window_cycles_at_word_boundaries(filler):
    tokens, bounds = filler.window(len(filler) + 500, start_unit=10)
    assert len(tokens) == len(filler) + 500
    assert bounds[0] == 0 and bounds[-1] == len(tokens)
    for b in bounds[1:-1][:200]:
        assert tokens[b] == ord(" ")  # every unit starts with its space


def test_method_spec_validation():
    with pytest.raises(ValueError, match="unknown method"):
        MethodSpec("fast")
    with pytest.raises(ValueError, match="calibration"):
        MethodSpec("longmamba")
    assert MethodSpec("vanilla").build(4) is None


# ----------------------------------------------------------------------------------------------
# Passkey


@pytest.mark.parametrize("length", [400, 1000, 5000])
def test_passkey_prompt_length_and_depth(filler, length):
    for depth in passkey.DEPTHS:
        p = passkey.make_prompt(TOK, filler, length, depth, "31415", start_unit=123)
        assert len(p.tokens) == length
        text = TOK.decode(p.tokens)
        assert text.startswith(passkey.INSTRUCTION)
        assert text.endswith(passkey.QUESTION)
        needle = passkey.NEEDLE.format(key="31415")
        assert TOK.decode(p.tokens[p.needle_pos:p.needle_pos + p.needle_len]) == needle
        assert text.count("31415") == 2
        # The needle sits at the word boundary nearest depth·filler (words are < 20 bytes).
        assert abs(p.filler_before - depth * p.filler_len) <= 20
        if depth == 0:
            assert p.needle_pos == len(TOK.encode(passkey.INSTRUCTION))
        if depth == 1:
            assert p.needle_pos + p.needle_len == length - len(TOK.encode(passkey.QUESTION))
    with pytest.raises(ValueError, match="too short"):
        passkey.make_prompt(TOK, filler, 100, 0.5, "31415")
    with pytest.raises(ValueError, match="depth"):
        passkey.make_prompt(TOK, filler, 1000, 1.5, "31415")
    with pytest.raises(ValueError, match="5 digits"):
        passkey.make_prompt(TOK, filler, 1000, 0.5, "123")


def test_passkey_parse_answer():
    assert passkey.parse_answer(" 12345. Remember it.") == "12345"
    assert passkey.parse_answer("is 1234567") == "12345"
    assert passkey.parse_answer(" 123") == "123"
    assert passkey.parse_answer("no digits") == ""


def test_passkey_scoring_with_oracle_and_wrong_runner():
    kw = dict(lengths=[400, 800], depths=[0, 0.5, 1], samples_per_depth=2, show_progress=False)
    good = passkey.run_passkey(FakeRunner(oracle_passkey), TOK, **kw, batch_size=4)
    assert len(good["samples"]) == 12
    assert all(s["correct"] for s in good["samples"])
    assert good["curves"]["accuracy"]["y"] == [100.0, 100.0]
    bad = passkey.run_passkey(FakeRunner(lambda t: " 00000"), TOK, **kw)
    assert bad["curves"]["accuracy"]["y"] == [0.0, 0.0]
    # Same seed -> same keys for every method; prompts hit their length exactly.
    assert [s["expected"] for s in good["samples"]] == [s["expected"] for s in bad["samples"]]
    assert all(s["prompt_len"] == s["length"] for s in good["samples"])


# ----------------------------------------------------------------------------------------------
# RULER


def echo(text):
    return text  # "generates" the prompt: every expected string found -> score 1


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_ruler_prompts(task):
    src = ruler._Sources(TOK, load_text())
    for length in (1500, 6000):
        p = ruler.make_prompt(task, TOK, length, seed=3, sources=src)
        assert length - 12 <= len(p.tokens) <= length  # NIAH/VT exact, lists within one item
        if ruler.TASKS[task][0] in ("niah", "vt"):
            assert len(p.tokens) == length
        text = TOK.decode(p.tokens)
        assert string_match(text, p.answers) == 1.0  # every answer is in the prompt
        for pos in p.needle_pos:
            assert 0 < pos < length
    # Deterministic per seed; different across seeds.
    a = ruler.make_prompt(task, TOK, 1500, seed=3, sources=src)
    b = ruler.make_prompt(task, TOK, 1500, seed=4, sources=src)
    assert a.answers == ruler.make_prompt(task, TOK, 1500, seed=3, sources=src).answers
    assert a.answers != b.answers


def string_match(text, answers):
    return ruler.string_match_all(text, answers)


def test_ruler_niah_needles_and_answers():
    src = ruler._Sources(TOK, load_text())
    p = ruler.make_prompt("niah_multivalue", TOK, 3000, seed=0, sources=src)
    text = TOK.decode(p.tokens)
    key = re.search(r"special magic numbers for (\S+) mentioned", text).group(1)
    found = re.findall(rf"for {re.escape(key)} is: (\d+)\.", text)
    assert sorted(found) == sorted(p.answers) and len(found) == 4
    p = ruler.make_prompt("niah_multikey", TOK, 3000, seed=0, sources=src)
    assert len(p.needle_pos) == 4 and len(p.answers) == 1
    p = ruler.make_prompt("vt", TOK, 3000, seed=0, sources=src)
    text = TOK.decode(p.tokens)
    assert p.needle_pos == sorted(p.needle_pos)  # the chain is in order
    assert f"VAR {p.answers[1]} = VAR {p.answers[0]}." in text
    p = ruler.make_prompt("cwe", TOK, 6000, seed=0, sources=src)
    words = re.findall(r"\d+\. (\w+)", TOK.decode(p.tokens))
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert sorted(top) == sorted(p.answers)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.make_prompt("nope", TOK, 1000)
    with pytest.raises(ValueError, match="too short"):
        ruler.make_prompt("niah_single_essay", TOK, 100, sources=src)


def test_ruler_scoring_with_echo_runner():
    res = ruler.run_ruler(FakeRunner(echo, truncate=False), TOK,
                          tasks=["niah_single_noise", "vt", "fwe"], lengths=[1500],
                          num_samples=2, show_progress=False)
    assert res["curves"]["mean"]["y"] == [100.0]
    res = ruler.run_ruler(FakeRunner(lambda t: "nothing"), TOK, tasks=["niah_multiquery"],
                          lengths=[1500], num_samples=1, show_progress=False)
    assert res["curves"]["niah_multiquery"]["y"] == [0.0]


# ----------------------------------------------------------------------------------------------
# Perplexity


def test_window_starts():
    assert perplexity.window_starts(1000, 200, 5) == [0, 200, 400, 600, 800]
    assert perplexity.window_starts(1000, 1000, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="longer --text"):
        perplexity.window_starts(100, 200, 2)


def test_perplexity_uniform_and_perfect_predictors():
    V = 257

    def uniform(tokens, last_n):
        return np.zeros((tokens.shape[0], last_n, V + 7), np.float32)  # padded vocab ignored

    def perfect(tokens, last_n):
        out = np.full((tokens.shape[0], last_n, V), -1e4, np.float32)
        nxt = tokens[:, -last_n + 1:]  # position t predicts token t + 1
        for b in range(tokens.shape[0]):
            out[b, np.arange(last_n - 1), nxt[b]] = 0.0
        return out

    kw = dict(lengths=[300, 600], windows=3, eval_tokens=50, show_progress=False)
    res = perplexity.run_perplexity(FakeRunner(logits_fn=uniform), TOK, **kw, batch_size=2)
    assert res["curves"]["perplexity"]["y"] == pytest.approx([V, V])
    assert len(res["samples"]) == 6
    res = perplexity.run_perplexity(FakeRunner(logits_fn=perfect), TOK, **kw)
    assert res["curves"]["perplexity"]["y"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="exceed eval_tokens"):
        perplexity.run_perplexity(FakeRunner(logits_fn=uniform), TOK, lengths=[50],
                                  eval_tokens=100)


# ----------------------------------------------------------------------------------------------
# LongBench


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def longbench_dir(tmp_path):
    _write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {"context": "Passage 1: Paris is the capital. " * 40, "input": "Capital of France?",
         "answers": ["Paris"], "length": 100},
        {"context": "short", "input": "Capital of Spain?", "answers": ["Madrid"], "length": 5},
    ])
    _write_jsonl(tmp_path / "trec_e.jsonl", [
        {"context": "examples", "input": "Who was he?", "answers": ["Human"],
         "all_classes": ["Human", "Location"], "length": L} for L in (100, 5000, 9000)
    ])
    return tmp_path


def test_longbench_prompt_and_truncation():
    sample = {"context": "abcdefghij" * 100, "input": "What?"}
    full, tail = longbench.build_prompt(TOK, "hotpotqa", sample, 10_000)
    text = TOK.decode(full)
    assert text == longbench.PROMPTS["hotpotqa"].format(**sample)
    assert TOK.decode(full[-tail:]).endswith("Question: What?\nAnswer:")
    cut, _ = longbench.build_prompt(TOK, "hotpotqa", sample, 301)
    assert len(cut) == 300  # first and last max_length // 2 tokens
    assert np.array_equal(cut[:150], full[:150]) and np.array_equal(cut[150:], full[-150:])


def test_longbench_scores_and_buckets(longbench_dir):
    answers = {"France": " Paris", "Spain": " Lisbon", "Who": "Human\nLocation"}

    def answer(text):
        return next(v for k, v in answers.items() if k in text)

    res = longbench.run_longbench(FakeRunner(answer), TOK, data_dir=str(longbench_dir),
                                  datasets=["hotpotqa"], show_progress=False)
    assert res["scores"]["hotpotqa"] == 50.0  # Paris right, Lisbon wrong
    assert [s["score"] for s in res["samples"]] == [1.0, 0.0]
    res = longbench.run_longbench(FakeRunner(answer), TOK, data_dir=str(longbench_dir), e=True,
                                  show_progress=False)
    assert res["settings"]["datasets"] == ["trec"]
    assert res["table"]["rows"][0] == ["trec", 100.0, 100.0, 100.0, 100.0]
    with pytest.raises(FileNotFoundError):
        longbench.load_dataset(str(longbench_dir), "qasper")
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        longbench.load_dataset(str(longbench_dir), "nope")


# ----------------------------------------------------------------------------------------------
# Outputs


def test_save_run_writes_json_markdown_and_plot(tmp_path):
    for method, acc in (("vanilla", [100.0, 0.0]), ("longmamba", [100.0, 80.0])):
        res = {"task": "passkey", "method": method, "metric": "accuracy (%)",
               "settings": {"seed": 0}, "curves": {"accuracy": {"x": [1000, 2000], "y": acc}},
               "table": {"columns": ["length", "acc"], "rows": [[1000, acc[0]], [2000, acc[1]]]},
               "samples": [{"length": 1000, "expected": "1", "produced": "1"}]}
        paths = outputs.save_run(str(tmp_path), res, quiet=True)
    assert os.path.getsize(paths["plot"]) > 1000
    with open(tmp_path / "passkey_longmamba.json") as f:
        assert json.load(f)["samples"][0]["produced"] == "1"
    summary = (tmp_path / "passkey.md").read_text()
    assert "| vanilla | 100.00 | 0.00 |" in summary and "| longmamba | 100.00 | 80.00 |" in summary


# ----------------------------------------------------------------------------------------------
# End to end on a tiny random model (CPU)


def test_end_to_end_tiny_model(tiny_params, tmp_path, longbench_dir):
    runner = LMRunner(tiny_params, backend="reference", eos_token_id=TOK.eos_token_id)
    res = passkey.run_passkey(runner, TOK, lengths=[300], depths=[0.5], max_new_tokens=3,
                              show_progress=False)
    (s,) = res["samples"]
    assert s["prompt_len"] == 300 and len(s["expected"]) == 5
    assert s["correct"] == (s["produced"] == s["expected"])
    outputs.save_run(str(tmp_path), res, quiet=True)

    # Params work directly too (wrapped in an LMRunner with the tokenizer's EOS).
    res = ruler.run_ruler(tiny_params, TOK, tasks=["niah_single_noise"], lengths=[400],
                          num_samples=1, max_new_tokens=2, show_progress=False)
    assert 0.0 <= res["curves"]["mean"]["y"][0] <= 100.0

    res = perplexity.run_perplexity(runner, TOK, lengths=[200, 300], windows=2, eval_tokens=50,
                                    batch_size=2, show_progress=False)
    ppl = res["curves"]["perplexity"]["y"]
    assert all(np.isfinite(ppl)) and all(100 < p < 1000 for p in ppl)  # random model ≈ V

    res = longbench.run_longbench(runner, TOK, data_dir=str(longbench_dir),
                                  datasets=["hotpotqa"], limit=1, max_length=300,
                                  max_new_tokens=2, show_progress=False)
    assert res["samples"][0]["prompt_len"] == 300

    (van,) = latency.run_latency(runner, TOK, [], lengths=[256], repeats=1, warmup=1,
                                 show_progress=False)
    assert van["method"] == "vanilla" and van["curves"]["overhead vs vanilla (%)"]["y"] == [0.0]


@pytest.mark.skipif(not hasattr(lm, "DeciMamba"), reason="longmamba_jax.DeciMamba not there yet")
def test_decimamba_tiny_model(tiny_params):
    runner = LMRunner(tiny_params, backend="reference", eos_token_id=TOK.eos_token_id)
    spec = MethodSpec("decimamba", decimamba_layers=(1,), L_base=100)
    res = passkey.run_passkey(runner, TOK, spec, lengths=[300], depths=[1.0], max_new_tokens=2,
                              show_progress=False)
    assert res["method"] == "decimamba" and res["samples"][0]["prompt_len"] == 300
    res = perplexity.run_perplexity(runner, TOK, spec, lengths=[300], windows=1, eval_tokens=50,
                                    show_progress=False)
    assert np.isfinite(res["curves"]["perplexity"]["y"][0])


@pytest.fixture(scope="module")
def calibration_file(tiny_params, tmp_path_factory):
    from longmamba_jax.calibration.record import calibrate

    tokens = np.asarray(TOK.encode(load_text()[:5000]))
    cal = calibrate(tiny_params, tokens, train_len=100, num_windows=2, backend="reference",
                    progress=False)
    path = tmp_path_factory.mktemp("cal") / "tiny.npz"
    cal.save(path)
    return str(path)


def test_longmamba_tiny_model(tiny_params, calibration_file):
    runner = LMRunner(tiny_params, backend="reference", eos_token_id=TOK.eos_token_id)
    # c_thr = 0: every channel is global, so the filter is surely on at 300 > train_len.
    spec = MethodSpec("longmamba", calibration=calibration_file, channel_threshold=0.0)
    res = passkey.run_passkey(runner, TOK, spec, lengths=[300], depths=[0.0], max_new_tokens=2,
                              show_progress=False)
    assert res["method"] == "longmamba" and res["samples"][0]["prompt_len"] == 300
    assert res["settings"]["calibration"] == calibration_file
    res = perplexity.run_perplexity(runner, TOK, spec, lengths=[300], windows=1, eval_tokens=50,
                                    show_progress=False)
    van = perplexity.run_perplexity(runner, TOK, lengths=[300], windows=1, eval_tokens=50,
                                    show_progress=False)
    assert res["curves"]["perplexity"]["y"] != van["curves"]["perplexity"]["y"]


def test_cli_passkey_smoke(tmp_path, calibration_file):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evals", "passkey", "--model", "tiny-random:mamba2",
           "--tokenizer", "bytes", "--method", "vanilla,longmamba,decimamba", "--lengths", "300",
           "--calibration", calibration_file, "--channel-threshold", "0",
           "--decimamba-layers", "1", "--decimamba-L-base", "100",
           "--depths", "0,1", "--max-new-tokens", "2", "--backend", "reference",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| length | depth 0 | depth 1 | mean |" in proc.stdout
    for name in ("passkey_vanilla.json", "passkey_vanilla.md", "passkey_longmamba.json",
                 "passkey_decimamba.json", "passkey.md", "passkey.png"):
        assert (out / name).is_file(), name
    with open(out / "passkey_vanilla.json") as f:
        run = json.load(f)
    assert [s["prompt_len"] for s in run["samples"]] == [300, 300]
    assert run["settings"]["model"] == "tiny-random:mamba2"
    summary = (out / "passkey.md").read_text()
    for method in ("vanilla", "longmamba", "decimamba"):
        assert f"| {method} |" in summary


def test_cli_saves_each_method_as_it_finishes(tmp_path, monkeypatch):
    """A run that fails (or is killed) at its second method keeps the first method's results."""
    from longmamba_evals.tasks.cli import main

    calls = []
    real = perplexity.run_perplexity

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(perplexity, "run_perplexity", failing_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["perplexity", "--model", "tiny-random:mamba2", "--tokenizer", "bytes", "--method",
              "vanilla,decimamba", "--decimamba-layers", "1", "--lengths", "120", "--windows", "1",
              "--eval-tokens", "4", "--backend", "reference", "--no-progress", "--no-plot",
              "--out", str(out)])
    assert (out / "perplexity_vanilla.json").is_file()
    assert not (out / "perplexity_decimamba.json").exists()


def test_cli_calibrates_longmamba_on_the_fly(tmp_path, capsys):
    """`--method longmamba` without --calibration on a tiny random model: calibrated on the task's
    text, with a note saying so; on a checkpoint without --train-len: one clear error."""
    from longmamba_evals.tasks.cli import main

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evals", "perplexity", "--model", "tiny-random:mamba1",
           "--tokenizer", "bytes", "--method", "longmamba", "--lengths", "200", "--windows", "1",
           "--eval-tokens", "4", "--train-len", "32", "--backend", "reference", "--no-progress",
           "--no-plot", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "note: no --calibration given; calibrating LongMamba now" in proc.stderr
    assert (out / "perplexity_longmamba.json").is_file()
    with pytest.raises(SystemExit):
        main(["passkey", "--model", str(tmp_path), "--tokenizer", "bytes", "--method",
              "longmamba", "--no-plot", "--out", str(out)])
    assert "pass --calibration FILE" in capsys.readouterr().err


def test_cli_errors():
    from longmamba_evals.tasks.cli import build_parser, main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["passkey", "--model", "m", "--tokenizer", "bytes",
                                   "--out", "o", "--lengths", "4kb"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["passkey", "--model", "m", "--tokenizer", "bytes",
                                   "--out", "o", "--method", "fast"])
    with pytest.raises(SystemExit) as e:  # longmamba without calibration: a clear error
        main(["passkey", "--model", "m", "--tokenizer", "bytes", "--out", "o",
              "--method", "longmamba"])
    assert e.value.code == 2


def test_triton_sass_loops():
    """The SASS loop counter: a backward branch closes a loop (its body counted by opcode,
    predicates and modifiers dropped); a forward branch does not."""
    from longmamba_evals.bench.triton_sass import sass_loops

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x0 */",
        "        /*0010*/                   FFMA R2, R3, R4, R5 ;   /* 0x0 */",
        "        /*0020*/                   MUFU.EX2 R6, R2 ;   /* 0x0 */",
        "        /*0030*/               @P0 FFMA.FTZ R2, R6, R4, R5 ;   /* 0x0 */",
        "        /*0040*/               @P1 BRA 0x60 ;   /* 0x0 */",
        "        /*0050*/                   LDG.E.128 R8, desc[UR4][R10.64] ;   /* 0x0 */",
        "        /*0060*/               @P0 BRA 0x10 ;   /* 0x0 */",
        "        /*0070*/                   EXIT ;   /* 0x0 */",
    ])
    [(start, end, counts)] = sass_loops(sass)
    assert (start, end) == (0x10, 0x60)
    assert counts == {"FFMA": 2, "MUFU": 1, "BRA": 2, "LDG": 1}


def test_triton_sass_captures_the_kernels_triton_ir():
    """The tool's hook on Pallas's Triton lowering still sees every kernel of a call (the lane
    layout: the states pass and the scan) on this jax, with no GPU and no triton package."""
    from longmamba_evals.bench.triton_sass import capture_triton_ir

    config, modules = capture_triton_ir("selective_scan", {}, 1024, None)
    assert config.block_e == 128 and len(modules) == 2
    assert all("tt.func" in m and "scf.for" in m for m in modules)
    assert any("selective_scan_states" in m for m in modules)


def test_bench_scan_parse_fields():
    """Config fields from the benchmark's command line: booleans, integers (negative ones
    too, so the config rejects them with its own message), strings."""
    from longmamba_evals.bench.common import parse_fields
    from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig

    assert parse_fields("layout=tile,block_e=8,prefetch=False,segments=-1") == dict(
        layout="tile", block_e=8, prefetch=False, segments=-1)
    assert parse_fields("") == {}
    with pytest.raises(ValueError, match="segments must be >= 0"):
        SelectiveScanPallasConfig(**parse_fields("segments=-1"))


def test_bench_scan_time_paired_rotates_and_ratios(monkeypatch):
    """Interleaved timing: every call runs once per round, the order rotates (so no call always
    goes first), and the per-round ratio of a 3 ms call to a 1 ms one reads about 3. The clock
    is a fake one that each call advances, so the ratio does not depend on the machine's load."""
    from longmamba_evals.bench import timing
    from longmamba_evals.bench.timing import paired_ratio, time_paired

    order, clock = [], [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def sleeper(name, ms):
        def fn():
            order.append(name)
            clock[0] += ms / 1e3
            return name
        return fn

    calls = {"a": (sleeper("a", 1), ()), "b": (sleeper("b", 3), ()), "c": (sleeper("c", 1), ())}
    medians, per_round = time_paired(calls, rounds=3, min_batch_s=0.0, sync=lambda out: out)
    assert {k: len(v) for k, v in per_round.items()} == {"a": 3, "b": 3, "c": 3}
    assert order[9:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # after 3 warm-ups each
    assert 2.0 < paired_ratio(per_round, "b", "a") < 4.5
    assert medians["b"] > medians["a"]


def test_profile_prefill_classify_and_summarize():
    """Kernel names of both stacks fall into the right class ("convert" is not a conv), and the
    summary divides by the number of traced prefills."""
    from longmamba_evals.bench.profile_prefill import classify, summarize

    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert classify("_chunk_scan_fwd_kernel") == "scan"
    assert classify("causal_conv1d_fwd_kernel") == "conv"
    assert classify("loop_convolution_fusion") == "conv"
    assert classify("loop_convert_fusion_3") == "other"
    assert classify("_layer_norm_fwd_1pass_kernel") == "norm"
    kernels = {"gemm_a": (4e6, 8), "ssd_scan": (2e6, 4), "loop_convert_fusion": (1e6, 2)}
    s = summarize(kernels, reps=2)
    assert s["total_ms"] == pytest.approx(3.5)
    assert s["by_class_ms"] == pytest.approx({"gemm": 2.0, "scan": 1.0, "other": 0.5})
    assert list(s["by_class_ms"]) == ["gemm", "scan", "other"]
    assert s["top"][0] == {"name": "gemm_a", "class": "gemm", "ms": 2.0, "launches": 4}


def test_profile_prefill_fusion_lines():
    """A kernel's defining HLO line comes with the body of the computation it calls, metadata
    stripped; the profiler's "fusion_2" finds HLO's "fusion.2"; unknown names are left out."""
    from longmamba_evals.bench.profile_prefill import fusion_lines

    hlo = (
        "%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {\n"
        "  %p0 = f32[4]{0} parameter(0)\n"
        "  %p1 = f32[4]{0} parameter(1)\n"
        "  ROOT %add.1 = f32[4]{0} add(%p0, %p1), metadata={op_name=\"x\"}\n"
        "}\n\n"
        "ENTRY %main (a: f32[4]) -> f32[4] {\n"
        "  %a = f32[4]{0} parameter(0)\n"
        "  %loop_add_fusion.2 = f32[4]{0} negate(%a)\n"
        "  ROOT %loop_add_fusion = f32[4]{0} fusion(%a, %a), kind=kLoop, calls=%fused_add\n"
        "}\n")
    out = fusion_lines(hlo, ["loop_add_fusion", "missing", "loop_add_fusion_2"])
    assert list(out) == ["loop_add_fusion", "loop_add_fusion_2"]
    assert out["loop_add_fusion_2"] == "%loop_add_fusion.2 = f32[4]{0} negate(%a)"
    text = out["loop_add_fusion"]
    assert text.startswith("ROOT %loop_add_fusion = f32[4]{0} fusion(%a, %a)")
    assert "add(%p0, %p1)" in text and "metadata" not in text


def test_method_names_with_selection_rules():
    """`--method longmamba-RULE` (or longmamba:RULE) builds LongMamba with that rule."""
    from longmamba_evals.tasks.cli import build_parser
    from longmamba_evals.tasks.methods import MethodSpec, check_method

    assert check_method("longmamba:bound") == "longmamba-bound"
    assert check_method("vanilla") == "vanilla"
    for bad in ("longmamba-topk", "vanilla-bound", "decimamba-alpha", "other"):
        with pytest.raises(ValueError, match="unknown method"):
            check_method(bad)
    args = build_parser().parse_args(
        ["passkey", "--model", "tiny-random:mamba2", "--tokenizer", "bytes", "--method",
         "vanilla,longmamba:alpha", "--calibration", "c.npz", "--rule-k", "5", "--out", "o"])
    assert args.method == ["vanilla", "longmamba-alpha"]
    params = lm.init_params(lm.Mamba2Config.tiny(n_layer=2), seed=0)
    stream = np.random.default_rng(0).integers(0, params.config.vocab_size, 200)
    cal = lm.calibrate(params, stream, train_len=8, num_windows=2, backend="associative",
                        progress=False)
    method = MethodSpec("longmamba-alpha", calibration=cal, rule_k=5).build()
    assert method.rule == "alpha" and method.selection.k == 5
    assert MethodSpec("longmamba", calibration=cal).build().rule == "threshold"
