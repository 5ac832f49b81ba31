"""The short-training code (`evals/short_train/`) and the bundled demo (`longmamba_jax.demo`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_evals.short_train import train as T
from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_evals.short_train.train_data import TaskSampler
from longmamba_evals.short_train.train_loop import export_and_calibrate, train, train_seeds
from longmamba_evals.short_train.train_model import decay_mask, mamba_init
from longmamba_evals.tasks.passkey import INSTRUCTION, make_prompt
from longmamba_evals.tasks.text import DEFAULT_TEXT, Filler
from longmamba_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _tiny(text: str, **kw) -> TrainConfig:
    base = dict(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=64, train_len=256,
                bucket=256, tokens_per_step=512, steps=8, lr=1e-2, warmup_steps=1, log_every=1,
                val_every=1000, ckpt_every=1000, val_prompts=4, text=text)
    base.update(kw)
    return TrainConfig(**base)


def _decode(ids) -> str:
    return TOK.decode([int(i) for i in ids])


def test_passkey_example_masks(small_text):
    sampler = TaskSampler(_tiny(small_text), Path(small_text).read_text())
    rng = np.random.default_rng(0)
    for instruction in (True, False):
        ex = sampler.passkey(rng, 60, instruction, key="12345", depth=0.5)
        text = _decode(ex.tokens)
        assert text.startswith(INSTRUCTION) == instruction
        assert text.endswith("What is the pass key? The pass key is 12345.")
        assert len(ex.tokens) == sampler.fixed[instruction] + 60
        # position t is scored on token t + 1
        ans = np.flatnonzero(ex.answer)
        assert _decode(ex.tokens[ans + 1]) == "12345"
        assert ans[-1] + 1 == len(ex.tokens) - 2  # the last digit, before the "."
        sec = np.flatnonzero(ex.second)
        assert _decode(ex.tokens[sec + 1]) == "12345"
        needle_at = text.find(" The pass key is 12345. Remember it. ")
        assert sec[0] + 1 == needle_at + len(" The pass key is 12345. Remember it. ")
        assert ex.lm[:-1].all() and not ex.lm[-1]


def test_batches_constant_tokens_and_curriculum(small_text):
    tc = _tiny(small_text, train_len=512, bucket=256, tokens_per_step=2048, lm_frac=0.2)
    sampler = TaskSampler(tc, Path(small_text).read_text())
    seen = set()
    for step in range(12):
        b = sampler.batch(step, total_steps=100)
        B, L = b.tokens.shape
        assert B * L == tc.tokens_per_step and L in (256, 512)
        seen.add(L)
        # left padding only; no loss on padding
        assert np.all(np.diff(b.mask, axis=1) >= 0)
        for m in (b.answer, b.second, b.lm):
            assert np.all(m <= b.mask)
        # phase 1 (step < 20): filler at most phase1_filler tokens in passkey rows
        pk = b.answer.sum(1) > 0
        real = b.mask.sum(1)[pk]
        instr = np.array([_decode(r[r_m > 0][:20]) == INSTRUCTION[:20]
                          for r, r_m in zip(b.tokens[pk], b.mask[pk], strict=True)])
        fixed = np.where(instr, sampler.fixed[True], sampler.fixed[False])
        assert np.all(real - fixed <= tc.phase1_filler)
    assert seen == {256, 512}
    a, b2 = sampler.batch(5, 100), sampler.batch(5, 100)
    np.testing.assert_array_equal(a.tokens, b2.tokens)  # a pure function of (seed, step)
    # another seed: other rows, but the same bucket at every step (so seeds train under vmap)
    other = TaskSampler(dataclasses.replace(tc, seed=7), Path(small_text).read_text())
    for step in range(30):
        x, y = sampler.batch(step, 100), other.batch(step, 100)
        assert x.tokens.shape == y.tokens.shape
        assert not np.array_equal(x.tokens, y.tokens)


def test_train_reduces_loss_and_resumes_identically(small_text, tmp_path):
    tc = _tiny(small_text)
    full = train(tc, tmp_path / "full", quiet=True)
    log = [json.loads(line)
           for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == tc.steps
    assert np.mean(losses[-2:]) < losses[0] - 0.1
    assert any("val_passkey_acc" in r for r in log)

    train(tc, tmp_path / "resumed", stop_after=4, quiet=True)
    resumed = train(tc, tmp_path / "resumed", quiet=True)
    events = [json.loads(line) for line in
              (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["step"] == 4 for e in events)
    for a, b in zip(jax.tree.leaves(full.weights), jax.tree.leaves(resumed.weights),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_same_weights(a, b):
    # Adam divides each gradient element by its own RMS, so float-order noise in an element whose
    # gradient is ~0 can move it by a small fraction of lr (1e-2 here): 3e-5 is 0.3% of one step.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=3e-5)


def test_seeds_together_equal_seeds_apart(small_text, tmp_path):
    """train_seeds([a, b]) (one vmapped step) gives each seed the weights of its own run."""
    tc = _tiny(small_text, steps=5, compute_dtype="float32")
    both = train_seeds(tc, [3, 5], [tmp_path / "s3", tmp_path / "s5"], quiet=True)
    apart = [train(dataclasses.replace(tc, seed=s), tmp_path / f"one{s}", quiet=True)
             for s in (3, 5)]
    for together, alone in zip(both, apart, strict=True):
        _assert_same_weights(together.weights, alone.weights)
    assert _max_diff(both[0].weights, both[1].weights) > 1e-2  # and the seeds differ
    for s in (3, 5):
        logs = [json.loads(line) for line in
                (tmp_path / f"s{s}" / "train_log.jsonl").read_text().splitlines()]
        alone = [json.loads(line) for line in
                 (tmp_path / f"one{s}" / "train_log.jsonl").read_text().splitlines()]
        np.testing.assert_allclose([r["loss"] for r in logs if "loss" in r],
                                   [r["loss"] for r in alone if "loss" in r], rtol=1e-5)
        assert json.loads((tmp_path / f"s{s}" / "train_config.json").read_text())["seed"] == s
    # resuming a seed on its own from the pair's checkpoint continues that seed's run
    more = dataclasses.replace(tc, seed=5, steps=7)
    train(more, tmp_path / "one5", quiet=True)
    resumed = train(more, tmp_path / "s5", quiet=True)
    _assert_same_weights(resumed.weights,
                         train(more, tmp_path / "one5", quiet=True).weights)


def test_micro_batches_give_the_same_step(small_text, tmp_path):
    tc = _tiny(small_text, steps=3, compute_dtype="float32")
    whole = train(tc, tmp_path / "k1", quiet=True)
    split = train(dataclasses.replace(tc, micro_batches=2), tmp_path / "k2", quiet=True)
    _assert_same_weights(whole.weights, split.weights)
    with pytest.raises(ValueError, match="micro_batches"):
        _tiny(small_text, micro_batches=3)


def test_train_seeds_errors(small_text, tmp_path, capsys):
    tc = _tiny(small_text)
    with pytest.raises(ValueError, match="distinct"):
        train_seeds(tc, [1, 1], [tmp_path / "a", tmp_path / "b"], quiet=True)
    with pytest.raises(ValueError, match="one output directory per seed"):
        train_seeds(tc, [1, 2], [tmp_path / "a"], quiet=True)
    assert T.main(["--seeds", "1,2", "--out", str(tmp_path / "x"), "--text", small_text]) == 2
    assert "must contain {seed}" in capsys.readouterr().err


def test_time_budget_fixes_the_step_count(small_text, tmp_path):
    tc = _tiny(small_text, steps=6, time_budget_s=1e6)
    train(tc, tmp_path / "long", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "long" / "train_log.jsonl").read_text().split("\n")
           if x]
    budget = next(r for r in log if r.get("event") == "budget")
    assert budget["total_steps"] == 6 and set(budget["step_time_s"]) == {"256"}
    assert budget["predicted_train_s"] > 0
    assert log[-1]["event"] == "done" and log[-1]["step"] == 6
    train(dataclasses.replace(tc, time_budget_s=1e-3), tmp_path / "short", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "short" / "train_log.jsonl").read_text().split("\n")
           if x]
    assert log[-1]["event"] == "done" and log[-1]["total_steps"] == 1


def test_export_calibrates_with_the_asked_storage_and_recalibrates(small_text, tmp_path, capsys):
    """A run's export calibrates with --calib-storage; --recalibrate calibrates the exported
    model again on the same windows (its own train_config.json) with another storage: the
    same θ as a first calibration with that storage, and the α the alpha/offline rules need."""
    tc = _tiny(small_text, steps=2, val_every=2, calib_windows=4)
    run, twin = tmp_path / "run", tmp_path / "twin"
    params = train(tc, run, quiet=True)
    _, grid = export_and_calibrate(params, tc, run, storage="grid", quiet=True)
    assert grid.storage == "grid"
    _, exact = export_and_calibrate(params, tc, twin, storage="exact", quiet=True)
    assert T.main(["--recalibrate", "--calib-storage", "exact", "--out", str(run)]) == 0
    again = lmj.Calibration.load(run / "calibration.npz")
    assert again.storage == "exact"
    for s in (300, 2000):
        for a, b in zip(exact.thresholds(s), again.thresholds(s), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6)
        for a, b in zip(exact.keep_fractions(s), again.keep_fractions(s), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6)
    assert T.main(["--recalibrate", "--out", str(tmp_path / "none")]) == 2
    assert "has no train_config.json" in capsys.readouterr().err


def test_resume_refuses_other_settings(small_text, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(
        json.dumps({**json.loads(json.dumps(_tiny(small_text).__dict__)), "d_model": 64}))
    with pytest.raises(ValueError, match="d_model"):
        train(_tiny(small_text), tmp_path / "run", quiet=True)


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_mamba_init(arch):
    cfg = (lmj.Mamba2Config.tiny(vocab_size=257) if arch == "mamba2"
           else lmj.MambaConfig.tiny(vocab_size=257))
    weights = mamba_init(cfg, 0).weights
    w = weights["layers"]["mixer"]
    bias = w["dt_bias"] if arch == "mamba2" else w["dt_proj"]["bias"]
    dt = np.log1p(np.exp(np.asarray(bias)))
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    if arch == "mamba2":
        a = np.exp(np.asarray(w["A_log"]))
        assert a.min() >= 1 and a.max() <= 16
    mask = decay_mask(weights)
    assert mask["layers"]["mixer"]["in_proj"]["kernel"]
    assert not mask["layers"]["mixer"]["A_log"] and not mask["layers"]["norm"]["weight"]


def test_config_validation():
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(arch="transformer")
    with pytest.raises(ValueError, match="multiple of bucket"):
        TrainConfig(train_len=500, bucket=256)


# ------------------------------------------------------------------------------ the demo

@pytest.fixture(scope="module")
def demo():
    from longmamba_jax.demo import DEMO_DIR, demo_model

    if not (DEMO_DIR / "model" / "config.json").exists():
        pytest.skip("no bundled demo model")
    return demo_model()


def test_demo_model_loads(demo):
    assert demo.train_len == 512
    assert isinstance(demo.params, lmj.Params)
    assert demo.tokenizer.decode(demo.tokenizer.encode("pass key 12345")) == "pass key 12345"
    n_global = sum(int(g.sum()) for g in demo.calibration.global_channels(0.05))
    assert n_global > 0


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_demo_passkey_prompt(demo, depth):
    text = Path(DEFAULT_TEXT).read_text(encoding="utf-8")[:20_000]
    n = 4 * demo.train_len + 37
    ids = demo.passkey_prompt("40721", text, n, depth)
    assert ids.shape == (n,) and ids.dtype == np.int32
    s = _decode(ids)
    assert s.startswith(INSTRUCTION) and s.endswith("What is the pass key? The pass key is")
    at = s.find(" The pass key is 40721.")
    filler_total = n - len(INSTRUCTION) - 59 - 38  # needle 59 bytes, question 38
    actual = (at - len(INSTRUCTION)) / filler_total
    assert abs(actual - depth) < 0.02  # the nearest word boundary
    # the same prompt as the evaluation suite builds (the format the model was trained on)
    ref = make_prompt(TOK, Filler.from_text(TOK, text), n, depth, "40721", 0)
    np.testing.assert_array_equal(ids, ref.tokens)


def test_demo_passkey_prompt_errors(demo):
    with pytest.raises(ValueError, match="5 digits"):
        demo.passkey_prompt("1234", "some text", 1000, 0.5)
    with pytest.raises(ValueError, match="too short"):
        demo.passkey_prompt("12345", "some text", 100, 0.5)
    with pytest.raises(ValueError, match="depth"):
        demo.passkey_prompt("12345", "some text", 1000, 1.5)
