"""Fine-tuning (`longmamba_jax.training`): whole-model gradients against torch autograd of the
transformers models, across backends and rematerialisation, the train step (fp32 master weights,
bf16 compute, micro-batches), token batches, checkpoint + resume, and input errors.

The torch side: the loss is `model(ids, labels=ids).loss` (mean next-token cross entropy), its
gradients are written with `save_pretrained` in place of the weights and read back with
`longmamba_jax.load`, so they arrive in our layout through the same key table as the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import longmamba_jax as lmj
from longmamba_jax import training
from longmamba_jax.demo import DEMO_DIR

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="compiled Pallas kernels need a CUDA GPU")

# name -> (arch, transformers config overrides); tied and untied heads, one and two groups
MODELS = {
    "mamba2": ("mamba2", dict(n_groups=2, tie_word_embeddings=True)),
    "mamba1": ("mamba1", dict(tie_word_embeddings=False, use_bias=True, time_step_rank=3)),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tree_rel(a, b) -> float:
    """Largest per-leaf relative error of two weight trees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(_rel(x, y) for x, y in zip(la, lb, strict=True))


def _tokens(batch, length, seed=0, vocab=67):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _loss_and_grads(params, batch, backend="reference", remat=None):
    def loss(w):
        logits = training.model_logits(w, params.config, batch, backend=backend, remat=remat)
        return training.causal_lm_loss(logits, batch)[0]

    return jax.jit(jax.value_and_grad(loss))(params.weights)


@pytest.fixture(scope="module")
def torch_grads(tmp_path_factory):
    """name -> (our Params, torch loss, torch gradients in our layout) on `_tokens(2, 19)`."""
    torch = pytest.importorskip("torch")
    from torch_models import make_torch_model, save_hf

    out = {}
    for name, (arch, overrides) in MODELS.items():
        model = make_torch_model(arch, **overrides)
        params = lmj.load(save_hf(model, tmp_path_factory.mktemp(name)))
        ids = torch.as_tensor(_tokens(2, 19), dtype=torch.long)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        grads = lmj.load(save_hf(model, tmp_path_factory.mktemp(name + "-grad"))).weights
        out[name] = (params, loss.item(), grads)
    return out


@pytest.mark.torch
@pytest.mark.parametrize("name", list(MODELS))
def test_grads_match_torch_autograd(torch_grads, name):
    params, torch_loss, torch_g = torch_grads[name]
    loss, g = _loss_and_grads(params, {"tokens": _tokens(2, 19)})
    assert abs(float(loss) - torch_loss) <= 1e-5 * torch_loss
    assert _tree_rel(g, torch_g) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("name", ["mamba2", pytest.param("mamba1", marks=pytest.mark.slow)])
def test_pallas_interpret_grads_equal_reference(torch_grads, name):
    """The Pallas kernels' backward passes (custom_vjp, through the interpreter here) inside the
    whole model give the reference backend's gradients (the selective scan's interpreted
    backward is slow: mamba1 is marked slow)."""
    params, _, torch_g = torch_grads[name]
    batch = {"tokens": _tokens(2, 19)}
    _, ref = _loss_and_grads(params, batch)
    _, out = _loss_and_grads(params, batch, backend="pallas-interpret")
    assert _tree_rel(out, ref) <= 1e-5
    assert _tree_rel(out, torch_g) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("remat", ["layer", pytest.param(jax.checkpoint_policies.dots_saveable,
                                                         marks=pytest.mark.slow)])
def test_remat_gives_the_same_grads(torch_grads, remat):
    params, _, _ = torch_grads["mamba2"]
    batch = {"tokens": _tokens(2, 19)}
    loss, ref = _loss_and_grads(params, batch)
    loss_r, out = _loss_and_grads(params, batch, remat=remat)
    assert float(loss_r) == float(loss)
    # the recomputed forward is the same program; only XLA's fusion of the backward may differ
    assert _tree_rel(out, ref) <= 1e-6


def _tiny(arch="mamba2", seed=0):
    config = (lmj.Mamba2Config(d_model=32, n_layer=2, vocab_size=67, d_state=8, headdim=16,
                               chunk_size=8) if arch == "mamba2"
              else lmj.MambaConfig(d_model=32, n_layer=2, vocab_size=67, d_state=8))
    return lmj.init_params(config, seed=seed, dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Mamba2 trained for 6 steps with bf16 compute on fp32 master weights (loaded in
    bf16), on a repeated batch, checkpointed every 3 steps; and what is needed to resume."""
    params = _tiny()
    optimizer = optax.adam(1e-2)
    start = training.init_train_state(params.astype(jnp.bfloat16), optimizer)
    step = training.make_train_step(params.config, optimizer, backend="reference",
                                    compute_dtype="bfloat16")
    batch = {"tokens": _tokens(4, 32, seed=3)}
    directory = tmp_path_factory.mktemp("tiny-run")
    state, records = training.fit(step, start, lambda _: batch, num_steps=6,
                                  log_path=directory / "log.jsonl",
                                  checkpoint_dir=directory / "ckpt", checkpoint_every=3,
                                  progress=False)
    return params, optimizer, step, batch, state, records, directory


def test_bf16_compute_with_fp32_master_weights_lowers_loss(tiny_run):
    params, _, _, _, state, records, directory = tiny_run
    fp32 = {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(state.params.weights)} == fp32
    assert {a.dtype for a in jax.tree.leaves(state.opt_state)
            if jnp.issubdtype(a.dtype, jnp.floating)} == fp32
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and int(state.step) == 6
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
    assert len((directory / "log.jsonl").read_text().splitlines()) == 6
    assert training.latest_step(directory / "ckpt") == 6


def test_checkpoint_resume_continues_identically(tiny_run, tmp_path):
    params, optimizer, step, batch, state, _, directory = tiny_run
    like = training.init_train_state(params, optimizer)
    restored = training.restore_checkpoint(directory / "ckpt", like, step=3)
    assert int(restored.step) == 3
    resumed, records = training.fit(step, restored, lambda _: batch, num_steps=6,
                                    progress=False)
    assert [r["step"] for r in records] == [4, 5, 6]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fit resumes by itself from the newest checkpoint of its directory
    again, records = training.fit(step, like, lambda _: batch, num_steps=6,
                                  checkpoint_dir=directory / "ckpt", progress=False)
    assert records == [] and int(again.step) == 6
    with pytest.raises(ValueError, match=r"does not fit this state .*shape"):
        training.restore_checkpoint(directory / "ckpt",
                                    training.init_train_state(_tiny("mamba1"), optimizer))
    with pytest.raises(ValueError, match="does not fit this state"):
        training.restore_checkpoint(directory / "ckpt",
                                    training.init_train_state(params, optax.sgd(0.1)))
    assert training.restore_checkpoint(tmp_path / "none", like) is None


@pytest.mark.slow
def test_micro_batches_give_the_same_step():
    params = _tiny()
    optimizer = optax.sgd(1.0)  # the update is the gradient
    batch = {"tokens": _tokens(4, 16, seed=4),
             "loss_mask": np.repeat([[0.0] * 5 + [1.0] * 11], 4, axis=0)}
    batch["loss_mask"][1, :] = 0  # rows count different numbers of predictions
    batch["loss_mask"][2, 9:] = 0
    outs = []
    for k in (1, 2):
        step = training.make_train_step(params, optimizer, backend="reference", micro_batches=k,
                                        donate=False)
        outs.append(step(training.init_train_state(params, optimizer), batch))
    (s1, m1), (s2, m2) = outs
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6 * float(m1["loss"])
    assert float(m1["tokens"]) == float(m2["tokens"]) == 11 + 0 + 4 + 11
    update = lambda s: jax.tree.map(jnp.subtract, s.params.weights, params.weights)
    # fp32 gradients summed in another order
    assert _tree_rel(update(s2), update(s1)) <= 1e-5


def test_loss_mask_and_packed_documents():
    """A packed row's loss is the loss of its documents run alone: the state resets at each
    document and predictions across a boundary or onto padding do not count."""
    params = _tiny("mamba1")
    a, b = _tokens(1, 9, seed=5)[0], _tokens(1, 14, seed=6)[0]
    batches = training.TokenBatches([a, b], batch_size=1, seq_len=32, shuffle=False)
    packed = batches.batch(0)
    np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 9 + [2] * 14 + [0] * 9)
    np.testing.assert_array_equal(packed["loss_mask"][0], [1] * 23 + [0] * 9)

    def ce_sum(batch):
        logits = training.model_logits(params.weights, params.config, batch,
                                       backend="reference")
        loss, m = training.causal_lm_loss(logits, batch)
        return float(loss) * float(m["tokens"]), float(m["tokens"])

    total, count = ce_sum(packed)
    # each document alone in its own row, right-padded (causal: padding changes nothing before)
    alone = np.zeros((2, 14), np.int32)
    alone[0, :9], alone[1] = a, b
    alone_total, alone_count = ce_sum({"tokens": alone,
                                       "loss_mask": (np.arange(14) < [[9], [14]]) * 1.0})
    assert count == alone_count == 8 + 13
    assert abs(total - alone_total) <= 1e-5 * total


def test_token_batches_stream_and_resume_order():
    stream = np.arange(1000) % 50
    data = training.TokenBatches(stream, batch_size=3, seq_len=64, seed=1)
    assert data.rows == 15 and "segment_ids" not in data.batch(0)
    seen = np.concatenate([data.batch(s)["tokens"] for s in range(5)])  # one epoch
    assert sorted(seen[:, 0].tolist()) == sorted((np.arange(15) * 64 % 50).tolist())
    np.testing.assert_array_equal(data.batch(7)["tokens"],
                                  training.TokenBatches(stream, batch_size=3, seq_len=64,
                                                        seed=1).batch(7)["tokens"])
    unpacked = training.TokenBatches([np.arange(70), np.arange(5)], batch_size=2, seq_len=64,
                                     pack=False, shuffle=False)
    assert unpacked.rows == 3
    np.testing.assert_array_equal(unpacked.loss_mask.sum(1), [64, 6, 5])


@pytest.mark.slow
def test_fine_tuning_the_demo_model_lowers_its_loss(tmp_path):
    """The README's example: the demo model fine-tuned on its filler text (here 4 steps on
    rows of 256 bytes), bf16 compute, layer remat; the loss of a batch drops."""
    demo = lmj.demo_model()
    text = (DEMO_DIR / "filler.txt").read_text(encoding="utf-8")
    data = training.TokenBatches(demo.tokenizer.encode(text), batch_size=2, seq_len=256)
    optimizer = optax.adamw(1e-3)
    step = training.make_train_step(demo.params, optimizer, backend="reference",
                                    compute_dtype="bfloat16", remat="layer")
    state, records = training.fit(step, training.init_train_state(demo.params, optimizer),
                                  data.batch, num_steps=4, progress=False)
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    def loss(weights):
        batch = data.batch(0)
        logits = training.model_logits(weights, demo.params.config, batch, backend="reference",
                                       compute_dtype="bfloat16")
        return float(training.causal_lm_loss(logits, batch)[0])

    before, after = loss(demo.params.astype(jnp.float32).weights), loss(state.params.weights)
    assert after < before - 0.01, (before, after)


def test_bad_inputs_give_clear_errors():
    params = _tiny()
    optimizer = optax.sgd(0.1)
    state = training.init_train_state(params, optimizer)
    step = training.make_train_step(params, optimizer, backend="reference", donate=False)
    tokens = _tokens(2, 8)
    with pytest.raises(ValueError, match=r"batch\['tokens'\] must be \[batch, length\]"):
        step(state, {"tokens": tokens[0]})
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has shape \(2, 7\)"):
        step(state, {"tokens": tokens, "loss_mask": np.ones((2, 7))})
    with pytest.raises(ValueError, match=r"batch\['segment_ids'\] has shape"):
        step(state, {"tokens": tokens, "segment_ids": np.ones((1, 8), np.int32)})
    with pytest.raises(ValueError, match="integer token ids"):
        step(state, {"tokens": tokens.astype(np.float32)})
    with pytest.raises(ValueError, match="'tokens'"):
        step(state, {"ids": tokens})
    with pytest.raises(ValueError, match="micro_batches 3 does not divide"):
        training.make_train_step(params, optimizer, backend="reference",
                                 micro_batches=3)(state, {"tokens": tokens})
    with pytest.raises(ValueError, match="remat must be"):
        _loss_and_grads(params, {"tokens": tokens}, remat="everything")
    with pytest.raises(ValueError, match="backend"):
        training.make_train_step(params, optimizer, backend="nope")
    with pytest.raises(ValueError, match="fewer than seq_len 64"):
        training.TokenBatches(np.arange(10), batch_size=1, seq_len=64)
    with pytest.raises(TypeError, match="Params"):
        training.init_train_state(params.weights, optimizer)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_compiled_pallas_grads_and_bf16_step(arch):
    """On a GPU: the compiled Pallas kernels' gradients in the whole model (1K tokens, several
    chunks) equal the reference backend's, and a bf16-compute step on them lowers the loss."""
    config = (lmj.Mamba2Config(d_model=256, n_layer=2, vocab_size=256, d_state=64, headdim=64,
                               chunk_size=256) if arch == "mamba2"
              else lmj.MambaConfig(d_model=256, n_layer=2, vocab_size=256, d_state=16))
    params = lmj.init_params(config, seed=0, dtype=jnp.float32)
    batch = {"tokens": _tokens(2, 1024, vocab=256)}
    _, ref = _loss_and_grads(params, batch)
    _, out = _loss_and_grads(params, batch, backend="pallas", remat="layer")
    assert _tree_rel(out, ref) <= 1e-3  # TF32-free fp32 kernels; summation order differs
    optimizer = optax.adam(3e-3)
    state = training.init_train_state(params, optimizer)
    step = training.make_train_step(config, optimizer, backend="pallas",
                                    compute_dtype="bfloat16", remat="layer")
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_head_gradient_matmuls_stay_in_bf16_where_matmuls_round_in_bf16(monkeypatch, tied):
    """With bf16 weights on a GPU (where `matmul_dtype` rounds in the matmul), the head's two
    gradient matmuls (d hidden, d weight: 2·l·d·V each) must run in bf16, as torch autocast runs
    them, not in fp32: an fp32 head output would make the cotangent, and so both matmuls, fp32."""
    import re

    from longmamba_jax import layers
    from longmamba_jax.model import lm_head

    cfg = lmj.MambaConfig(d_model=32, n_layer=1, vocab_size=200, d_state=4,
                          tie_embeddings=tied)
    params = lmj.init_params(cfg, 0, jnp.bfloat16)
    h = jnp.ones((1, 8, 32), jnp.float32)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    loss = lambda p, h: jnp.sum(lm_head(p, h) ** 2)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, h).as_text()
    vocab = cfg.padded_vocab_size
    dots = [line for line in hlo.splitlines() if "dot_general" in line and f"{vocab}x" in line]
    assert len(dots) == 3  # the forward and the two gradient matmuls
    for line in dots:
        operands = re.search(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", line)
        assert operands and all("bf16" in t for t in operands.groups()), line
