"""The train-short-test-long pipeline end to end on CPU with tiny models: several seeds trained
together, export, calibration, evaluation (`evals/short_train/evaluate.py`), and the aggregation
over seeds (`evals/short_train/aggregate.py`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from longmamba_evals.short_train import aggregate as A
from longmamba_evals.short_train import evaluate as E
from longmamba_evals.short_train import train as T
from longmamba_evals.short_train.train_config import TrainConfig
from longmamba_evals.short_train.train_data import BatchSource


def test_batch_workers_match_inline(small_text):
    tc = TrainConfig(train_len=512, bucket=256, tokens_per_step=2048, text=small_text)
    tcs = [dataclasses.replace(tc, seed=s) for s in (0, 4)]
    text = Path(small_text).read_text()
    inline, workers = BatchSource(tcs, text, 0), BatchSource(tcs, text, 1)
    try:
        workers.prefetch(0, 50)
        for step, total in [(0, 50), (1, 50), (2, 10), (3, 10)]:  # the schedule changes at 2
            a, b = inline.get(step, total), workers.get(step, total)
            assert a["tokens"].shape[0] == 2
            for k in a:
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    finally:
        workers.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_train_evaluate_aggregate(arch, small_text, tmp_path):
    out = str(tmp_path / "seed{seed}")
    args = ["--arch", arch, "--seeds", "0,1", "--out", out, "--d-model", "32", "--n-layer", "2",
            "--d-state", "8", "--headdim", "16", "--chunk-size", "64", "--train-len", "256",
            "--bucket", "256", "--tokens-per-step", "512", "--steps", "2", "--calib-windows", "2",
            "--val-prompts", "2", "--text", small_text]
    if arch == "mamba1":
        args += ["--scan-backend", "reference", "--micro-batches", "2"]
    assert T.main(args) == 0
    runs = [tmp_path / "seed0", tmp_path / "seed1"]
    for run in runs:
        assert (run / "model" / "config.json").exists() and (run / "calibration.npz").exists()
    assert E.main([str(r) for r in runs] + [
        "--samples", "1", "--multiples", "1,2", "--batch-size", "5", "--diagnose-prompts", "1",
        "--ppl-windows", "2", "--levers", "rho0.2:rho=0.2,c=0.1", "--lever-samples", "1",
        "--lever-multiples", "2"]) == 0
    for run in runs:
        for m in ("vanilla", "longmamba", "decimamba"):
            r = json.loads((run / "eval" / f"passkey_{m}.json").read_text())
            assert r["curves"]["accuracy"]["x"] == [256, 512]
            assert len(r["samples"]) == 2 * 5  # 2 lengths x 5 depths x 1 key
            p = json.loads((run / "eval" / f"perplexity_{m}.json").read_text())
            assert all(np.isfinite(p["curves"]["perplexity"]["y"]))
        rows = json.loads((run / "needle_deltas.json").read_text())
        assert rows and all(r["length"] == 512 and "key_kept" in r for r in rows)
        lever = json.loads((run / "levers" / "rho0.2" / "passkey_longmamba.json").read_text())
        assert lever["settings"]["lever"] == {"name": "rho0.2", "channel_threshold": 0.1,
                                              "scale": 1.0, "clamp_top": 0.2}
        assert (run / "levers" / "rho0.2" / "calibration.npz").exists()

    summary_dir = tmp_path / "summary"
    assert A.main([str(r) for r in runs] + ["--out", str(summary_dir)]) == 0
    s = json.loads((summary_dir / "summary.json").read_text())[arch]
    assert s["seeds"] == [0, 1] and s["steps"] == [2]
    v0 = json.loads((runs[0] / "eval" / "passkey_vanilla.json").read_text())
    v1 = json.loads((runs[1] / "eval" / "passkey_vanilla.json").read_text())
    mean = (v0["curves"]["accuracy"]["y"][1] + v1["curves"]["accuracy"]["y"][1]) / 2
    assert s["passkey"]["vanilla"]["512"]["mean"] == pytest.approx(mean)
    assert s["passkey"]["vanilla"]["512"]["n"] == 2
    assert set(s["levers"]) == {"rho0.2"}
    md = (summary_dir / "summary.md").read_text()
    assert f"## {arch}: seeds [0, 1]" in md and "### passkey per seed" in md
    assert (summary_dir / "passkey_seeds.png").stat().st_size > 0


def _fake_run(root: Path, seed: int, curves: dict) -> Path:
    run = root / f"seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"arch": "mamba2", "seed": seed,
                                                       "train_len": 100}))
    for method, ys in curves.items():
        (run / "eval" / f"passkey_{method}.json").write_text(json.dumps({
            "task": "passkey", "method": method, "curves": {"accuracy": {
                "x": [100, 200, 800, 1600], "y": ys}}}))
    return run


def test_aggregate_mean_spread_and_goal(tmp_path):
    runs = [_fake_run(tmp_path, 0, {"vanilla": [100, 90, 40, 20], "longmamba": [100, 90, 90, 60]}),
            _fake_run(tmp_path, 1, {"vanilla": [100, 100, 60, 20], "longmamba": [100, 95, 80,
                                                                                 40]})]
    s = A.aggregate(A.load_seed_runs(runs))["mamba2"]
    assert s["passkey"]["vanilla"][800]["mean"] == 50
    assert s["passkey"]["vanilla"][800]["std"] == pytest.approx(np.std([40, 60], ddof=1))
    assert (s["passkey"]["longmamba"][1600]["min"], s["passkey"]["longmamba"][1600]["max"]) == (
        40, 60)
    g = s["goal"]
    assert [p["gain_8_16"] for p in g["per_seed"]] == [45, 20]  # mean of (+50, +40), (+20, +20)
    assert [p["gain_1_2"] for p in g["per_seed"]] == [0, -5]
    assert g["gain_8_16"]["mean"] == 32.5
    md = A.summary_markdown({"mamba2": s})
    assert "| LongMamba | 100 ± 0 (100–100) | 92 ± 4 (90–95) |" in md
    assert "LongMamba − vanilla, mean over 8× and 16×: 32 ± 18 (20–45) points" in md
    with pytest.raises(FileNotFoundError, match="train_config"):
        A.load_seed_runs([tmp_path])


def _rules_run(root: Path, arch: str, seed: int, accuracy: dict, ppl: dict | None = None) -> Path:
    """A run directory as EVAL=rules leaves it: train_config.json and, under rules1/passkey/,
    one eval-CLI passkey result per method (a gzipped one too), whose samples hold per depth at
    200 tokens `accuracy[method][depth]` correct out of 10."""
    import gzip

    d = root / f"{arch}_seed{seed}"
    (d / "rules1" / "passkey").mkdir(parents=True)
    (d / "rules2" / "perplexity").mkdir(parents=True)
    (d / "train_config.json").write_text(json.dumps({"arch": arch, "seed": seed,
                                                       "train_len": 100}))
    for i, (method, by_depth) in enumerate(accuracy.items()):
        samples = [{"length": 200, "depth": depth, "correct": k < hits}
                   for depth, hits in by_depth.items() for k in range(10)]
        samples += [{"length": 400, "depth": 0.0, "correct": True}]
        r = {"task": "passkey", "method": method, "samples": samples,
             "curves": {"accuracy": {"x": [200, 400],
                                     "y": [10.0 * np.mean(list(by_depth.values())), 100.0]}}}
        path = d / "rules1" / "passkey" / f"passkey_{method}.json"
        if i % 2:
            with gzip.open(str(path) + ".gz", "wt", encoding="utf-8") as f:
                json.dump(r, f)
        else:
            path.write_text(json.dumps(r))
    for method, (short, long) in (ppl or {}).items():
        (d / "rules2" / "perplexity" / f"perplexity_{method}.json").write_text(json.dumps(
            {"task": "perplexity", "method": method,
             "curves": {"perplexity": {"x": [100, 200], "y": [short, long]}}}))
    return d


def test_rules_summary_tables(tmp_path):
    from longmamba_evals.short_train import rules_summary as R

    runs = [_rules_run(tmp_path, "mamba2", 0,
                       {"vanilla": {0.0: 0, 1.0: 10}, "longmamba-budget": {0.0: 9, 1.0: 10}},
                       {"vanilla": (5.0, 4.0), "longmamba-budget": (5.0, 4.2)}),
            _rules_run(tmp_path, "mamba2", 1,
                       {"vanilla": {0.0: 2, 1.0: 10}, "longmamba-budget": {0.0: 7, 1.0: 10}},
                       {"vanilla": (6.0, 4.4)})]
    s = R.summarize(R.load_rule_runs(runs), depth_length=200)["mamba2"]
    assert s["seeds"] == [0, 1] and s["lengths"] == [200, 400]
    assert s["accuracy"]["vanilla"][200] == [50.0, 60.0]
    assert [r["depths"] for r in s["by_depth"]["longmamba-budget"]] == [
        {0.0: 90.0, 1.0: 100.0}, {0.0: 70.0, 1.0: 100.0}]
    assert s["perplexity"]["longmamba-budget"] == {100: [5.0], 200: [4.2]}
    md = R._markdown({"mamba2": s})
    assert "| vanilla | 55 (50–60) | 100 (100–100) | 2 |" in md
    assert "| `budget` | 80 | 100 | 70 |" in md  # depth 0: mean of 90 and 70; worst cell 70
    assert "| vanilla | 5.50 (5.00–6.00) | 4.20 (4.00–4.40) | 2 |" in md
    assert "| `budget` | 5.00 | 4.20 | 1 |" in md
    assert R.main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "out"), "--no-plot",
                   "--depth-length", "200"]) == 0
    assert "## mamba2: accuracy (%) by depth at 2× L_train (200 tokens)" in (
        tmp_path / "out" / "rules_summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="train_config"):
        R.load_rule_runs([tmp_path])
