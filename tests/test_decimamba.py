"""DeciMamba: the plan, the kept indices, and the shorter sequence downstream."""

from __future__ import annotations

import numpy as np
import pytest

import longmamba_jax as lmj
from longmamba_jax.model import apply_model


def test_plan_follows_the_published_formula():
    cfg = lmj.Mamba2Config.tiny(n_layer=24)
    dm = lmj.DeciMamba(layers=(12, 14, 16), L_base=2000, beta=0.5, min_seq_len=20, keep_last=1)
    # L=16001: P_0 = min(16000, 2000) = 2000; P_1 = min(2000, 1000) = 1000; P_2 = 500.
    assert dm.plan(cfg, 16001) == ((12, 2000, 1), (14, 1000, 1), (16, 500, 1))
    # Short prompt: nothing to drop in the first layer (P_0 capped at L - keep_last).
    assert dm.plan(cfg, 1500) == ((14, 1000, 1), (16, 500, 1))
    # min_seq_len floors the count: L_base·β^s = 2 < 20.
    dm2 = lmj.DeciMamba(layers=(0, 1), L_base=4, beta=0.5, min_seq_len=20, keep_last=3)
    assert dm2.plan(cfg, 100) == ((0, 20, 3),)
    with pytest.raises(ValueError, match="layer 30"):
        lmj.DeciMamba(layers=(30,), L_base=10).plan(cfg, 100)
    with pytest.raises(ValueError, match="ascending"):
        lmj.DeciMamba(layers=(3, 2), L_base=10)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_kept_indices_are_the_top_dt_norms_in_order(arch):
    cfg = (lmj.Mamba2Config.tiny(n_layer=3) if arch == "mamba2"
           else lmj.MambaConfig.tiny(n_layer=3))
    params = lmj.init_params(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))
    layer, keep, keep_last = 1, 9, 4
    dm = lmj.DeciMamba(layers=(layer,), L_base=keep, min_seq_len=1, keep_last=keep_last)
    assert dm.plan(cfg, 30) == ((layer, keep, keep_last),)
    # Δ of the decimating layer is what a vanilla run computes there (layers before it are
    # untouched), so the rule can be applied by hand to the captured Δ.
    dt = np.asarray(apply_model(params, tokens, capture_dt=True).dt[layer])  # [b, l, C]
    score = np.sqrt((dt[:, : 30 - keep_last] ** 2).sum(-1))
    expected = [sorted(np.argsort(-s, kind="stable")[:keep].tolist()) + [26, 27, 28, 29]
                for s in score]
    logits, positions = lmj.forward(params, tokens, method=dm, backend="reference",
                                    return_positions=True)
    assert np.asarray(positions).tolist() == expected
    assert logits.shape == (2, keep + keep_last, cfg.padded_vocab_size)
    logits_assoc = lmj.forward(params, tokens, method=dm, backend="associative")
    np.testing.assert_allclose(np.asarray(logits_assoc), np.asarray(logits), rtol=2e-5,
                               atol=2e-5)


def test_decimation_shortens_the_sequence_and_a_no_op_plan_is_vanilla():
    cfg = lmj.Mamba2Config.tiny(n_layer=2)
    params = lmj.init_params(cfg, seed=2)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 24))
    dm = lmj.DeciMamba(layers=(1,), L_base=7, min_seq_len=1, keep_last=2)
    logits, positions = lmj.forward(params, tokens, method=dm, backend="reference",
                                    return_positions=True)
    kept = np.asarray(positions)[0]
    assert logits.shape[1] == 9
    assert kept.shape == (9,) and np.all(np.diff(kept) > 0) and kept[-2:].tolist() == [22, 23]
    vanilla = lmj.forward(params, tokens, backend="reference")
    # Tokens were dropped before layer 1's SSM, so the last position's logits change.
    assert not np.allclose(np.asarray(logits)[0, -1], np.asarray(vanilla)[0, -1], atol=1e-4)
    # Keeping every token is no decimation at all: bit-identical to vanilla.
    keep_all = lmj.DeciMamba(layers=(1,), L_base=22, min_seq_len=1, keep_last=2)
    assert keep_all.plan(cfg, 24) == ()
    same = lmj.forward(params, tokens, method=keep_all, backend="reference")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(vanilla))
