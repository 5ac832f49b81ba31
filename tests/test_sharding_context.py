"""Context-parallel prefill on 8 host devices: one prompt split along the sequence gives the
one-device logits and final cache (fp32, relative error <= 1e-5 against the sequential
reference scan), for both architectures, the Pallas kernels (interpreted) and the jnp
scans, with data parallelism beside it, in rounds with a carried cache, with LongMamba's
filter (θ of the whole length); and the errors for what it cannot do.

Like test_sharding.py, the main run re-runs this module in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/host_devices.py).
"""

from __future__ import annotations

import functools

import pytest
from host_devices import CHILD, run_child, slow_decay

slow = pytest.mark.slow

if not CHILD:

    def test_on_8_host_devices():
        run_child(__file__, slow=False)

    @slow
    def test_on_8_host_devices_slow():
        run_child(__file__, slow=True)

else:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import longmamba_jax as lmj
    from longmamba_jax.calibration import calibrate
    from longmamba_jax.sharding import make_mesh

    CONFIGS = {
        "mamba2": lambda: lmj.Mamba2Config.tiny(d_model=64, headdim=16, ngroups=2),
        "mamba1": lambda: lmj.MambaConfig.tiny(d_model=32),
    }
    ARCHS = list(CONFIGS)
    BACKENDS = ["associative", "pallas-interpret"]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def _tokens(config, batch, length, seed=0):
        return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))

    @functools.cache
    def _model(arch):
        return slow_decay(jax.jit(lambda: lmj.init_params(CONFIGS[arch](), seed=1))())

    @functools.cache
    def _calibration(arch):
        model = _model(arch)
        stream = np.random.default_rng(0).integers(0, model.config.vocab_size, 400)
        return calibrate(model, stream, train_len=16, num_windows=6, backend="associative",
                         progress=False)

    def test_eight_devices():
        assert jax.device_count() == 8

    @slow
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("shape", ["seq8", "seq4_data2"])
    @pytest.mark.parametrize("arch", ARCHS)
    def test_forward_equals_one_device(arch, shape, backend):
        model = _model(arch)
        shape = dict(seq=8) if shape == "seq8" else dict(seq=4, data=2)
        tokens = _tokens(model.config, shape.get("data", 1) * 2, 64)
        ref = lmj.forward(model, tokens, backend="reference")
        out = lmj.forward_context_parallel(model, tokens, make_mesh(**shape), backend=backend)
        assert out.shape == ref.shape
        assert out.sharding.spec[1] == "seq"
        assert rel(out, ref) < 1e-5

    @pytest.mark.parametrize("arch,shape", [("mamba2", dict(seq=4, data=2)),
                                            ("mamba1", dict(seq=8))], ids=str)
    def test_prefill_equals_one_device(arch, shape):
        """One round: the last logits and the whole cache (conv window and SSM state) equal
        the one-device prefill's; the state from the earlier pieces matters (the last piece
        alone gives other logits)."""
        model = _model(arch)
        tokens = _tokens(model.config, 2, 96, seed=7)
        ref_logits, ref_cache = lmj.prefill(model, tokens, backend="reference")
        logits, cache = lmj.prefill_context_parallel(model, tokens, make_mesh(**shape),
                                                     backend="associative")
        assert rel(logits, ref_logits) < 1e-5
        assert rel(cache.ssm, ref_cache.ssm) < 1e-5 and rel(cache.conv, ref_cache.conv) < 1e-5
        alone, _ = lmj.prefill(model, tokens[:, -96 // shape["seq"]:], backend="reference")
        assert rel(alone, ref_logits) > 1e-3

    @slow
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("arch", ARCHS)
    def test_prefill_in_rounds_equals_one_device(arch, backend):
        """Rounds of 8 devices × 5 tokens, a smaller round for the rest and the last 3 tokens on
        one program; then a continuation from that cache, and a decode step from it."""
        model = _model(arch)
        tokens = _tokens(model.config, 2, 107, seed=4)
        ref_logits, ref_cache = lmj.prefill(model, tokens, backend="reference")
        mesh = make_mesh(seq=8)
        logits, cache = lmj.prefill_context_parallel(model, tokens, mesh, backend=backend,
                                                     chunk_size=5)
        assert rel(logits, ref_logits) < 1e-5
        assert rel(cache.ssm, ref_cache.ssm) < 1e-5 and rel(cache.conv, ref_cache.conv) < 1e-5
        more = _tokens(model.config, 2, 32, seed=5)
        ref_logits, ref_cache = lmj.prefill(model, more, cache=ref_cache, backend="reference")
        logits, cache = lmj.prefill_context_parallel(model, more, mesh, cache=cache,
                                                     backend=backend)
        assert rel(logits, ref_logits) < 1e-5 and rel(cache.ssm, ref_cache.ssm) < 1e-5
        tok = np.asarray(jnp.argmax(ref_logits, -1))
        ref_step, _ = lmj.decode_step(model, ref_cache, tok, donate=False)
        step, _ = lmj.decode_step(model, cache, tok, donate=False)
        assert rel(step, ref_step) < 1e-5

    @pytest.mark.parametrize("arch", ["mamba2", pytest.param("mamba1", marks=slow)])
    def test_longmamba_uses_the_whole_length(arch):
        """The filter's θ is the one of the whole prompt (also when it goes in rounds), so the
        result is the one-device filtered prefill (which θ of another length changes)."""
        model = _model(arch)
        method = lmj.LongMamba(_calibration(arch), channel_threshold=0.0)
        tokens = _tokens(model.config, 1, 128, seed=6)
        ref_logits, ref_cache = lmj.prefill(model, tokens, method=method, backend="reference")
        vanilla, _ = lmj.prefill(model, tokens, backend="reference")
        assert rel(vanilla, ref_logits) > 1e-3  # the filter is on
        other, _ = lmj.prefill(model, tokens, method=method, backend="reference", total_len=512)
        assert rel(other, ref_logits) > 1e-4  # and θ's length matters
        logits, cache = lmj.prefill_context_parallel(  # 4 rounds of 8 × 4 tokens
            model, tokens, make_mesh(seq=8), method=method, backend="associative", chunk_size=4)
        assert rel(logits, ref_logits) < 1e-5 and rel(cache.ssm, ref_cache.ssm) < 1e-5

    def test_what_context_parallelism_refuses():
        model = _model("mamba2")
        tokens = _tokens(model.config, 1, 64)
        with pytest.raises(ValueError, match="does not combine with tensor parallelism"):
            lmj.forward_context_parallel(model, tokens, make_mesh(seq=4, tensor=2))
        with pytest.raises(ValueError, match="no context axis 'ctx'"):
            lmj.forward_context_parallel(model, tokens, make_mesh(seq=8), context_axis="ctx")
        with pytest.raises(ValueError, match="cannot be split in 8 context-parallel pieces"):
            lmj.forward_context_parallel(model, tokens[:, :60], make_mesh(seq=8))
        with pytest.raises(ValueError, match="cannot be split in 8 context-parallel pieces"):
            lmj.forward_context_parallel(model, tokens[:, :16], make_mesh(seq=8))  # d_conv − 1
        with pytest.raises(ValueError, match="batch 1 is not a multiple"):
            lmj.forward_context_parallel(model, tokens, make_mesh(seq=4, data=2))
        with pytest.raises(ValueError, match="DeciMamba"):
            lmj.prefill_context_parallel(model, tokens, make_mesh(seq=8),
                                         method=lmj.DeciMamba(layers=(1,), L_base=10))
        with pytest.raises(ValueError, match="rule 'channelwise_topk'"):
            lmj.prefill_context_parallel(
                model, tokens, make_mesh(seq=8),
                method=lmj.LongMamba(_calibration("mamba2"), channel_threshold=0.0,
                                     rule="channelwise_topk"))
