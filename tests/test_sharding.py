"""Sharding: the partition rules cover every weight, and on 8 host devices a sharded model
(data / fsdp / tensor) gives the unsharded model's logits, decode steps, generations, gradients
and optimizer updates; the eval CLI's --data-parallel gives the same results.

The rule tests run in this process (any device count, abstract meshes). The multi-device
tests need 8 CPU devices, which XLA creates only when the flag is set before jax starts: in
the main run this module re-runs itself in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`test_on_8_host_devices`, and its slow
twin for the tests marked slow; tests/host_devices.py), so the rest of the suite keeps one
device.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_devices import CHILD, run_child, slow_decay
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import longmamba_jax as lmj
from longmamba_jax import config as config_module
from longmamba_jax.sharding import AXES, default_rules, param_specs
from longmamba_jax.sharding.rules import match_rules

slow = pytest.mark.slow

CONFIGS = {
    # heads 8, ngroups 2, in_proj 296 columns, padded vocab 64: every split below divides
    "mamba2": lambda: lmj.Mamba2Config.tiny(d_model=64, headdim=16, ngroups=2,
                                            tie_embeddings=False),
    "mamba1": lambda: lmj.MambaConfig.tiny(d_model=32, tie_embeddings=False),
}


def _abstract(**sizes):
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _every_config():
    """One tiny config of every config class the library defines (biases on, untied head),
    so that a new class or weight without a rule fails here."""
    out = []
    for _, cls in inspect.getmembers(config_module, inspect.isclass):
        if cls.__module__ == config_module.__name__ and hasattr(cls, "tiny") and \
                dataclasses.is_dataclass(cls):
            out.append(cls.tiny(bias=True, tie_embeddings=False))
    return out


if not CHILD:

    def test_on_8_host_devices():
        run_child(__file__, slow=False)

    @slow
    def test_on_8_host_devices_slow():
        run_child(__file__, slow=True)

    def test_every_config_class_is_covered():
        assert {type(c).__name__ for c in _every_config()} >= {"MambaConfig", "Mamba2Config"}

    @pytest.mark.parametrize("config", _every_config(), ids=lambda c: type(c).__name__)
    def test_rules_cover_every_weight(config):
        params = jax.eval_shape(lambda: lmj.init_params(config))
        specs = match_rules(params.weights, default_rules(config))
        assert all(isinstance(s, P) for s in specs.values())
        specs = param_specs(params, _abstract(data=2, fsdp=2, tensor=2)).weights
        assert specs["layers"]["mixer"]["out_proj"]["kernel"] == P(None, "tensor", "fsdp")
        assert specs["embedding"]["weight"] == P("tensor", "fsdp")
        assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
        assert specs["norm_f"]["weight"] == P()

    @pytest.mark.parametrize("name", ["Zamba2Config", "BambaConfig"])
    def test_hybrid_models_need_their_own_rules(name):
        config = getattr(lmj, name).tiny()
        params = jax.eval_shape(lambda: lmj.init_params(config))
        with pytest.raises(ValueError, match=f"no default partition rules for {name}"):
            param_specs(params, _abstract(tensor=2))

    def test_weight_without_rule_is_named():
        config = CONFIGS["mamba2"]()
        params = jax.eval_shape(lambda: lmj.init_params(config))
        weights = {**params.weights, "extra": {"gate": jax.ShapeDtypeStruct((4,), jnp.float32)}}
        with pytest.raises(ValueError, match=r"no partition rule matches the weights "
                                             r"\['extra/gate'\]"):
            param_specs(dataclasses.replace(params, weights=weights), _abstract(tensor=2))

    def test_user_rules_and_axes_the_mesh_lacks():
        config = CONFIGS["mamba1"]()
        params = jax.eval_shape(lambda: lmj.init_params(config))
        rules = [(r"layers/mixer/in_proj/kernel", P(None, None, "tensor")), (r".*", P())]
        specs = param_specs(params, _abstract(tensor=4), rules).weights
        assert specs["layers"]["mixer"]["in_proj"]["kernel"] == P(None, None, "tensor")
        assert specs["layers"]["mixer"]["out_proj"]["kernel"] == P()
        # the default rules name fsdp and tensor; a data-only mesh replicates the weights
        specs = param_specs(params, _abstract(data=8)).weights
        assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
        with pytest.raises(ValueError, match="names axes \\['model'\\]"):
            param_specs(params, _abstract(tensor=2), [(r".*", P("model"))])

    def test_indivisible_dimension_is_an_error():
        config = lmj.Mamba2Config.tiny()  # 4 heads
        params = jax.eval_shape(lambda: lmj.init_params(config))
        with pytest.raises(ValueError, match=r"layers/mixer/A_log: dimension 4 of shape "
                                             r"\(2, 4\) is not divisible by mesh axes "
                                             r"\('tensor',\) \(size 8\)"):
            param_specs(params, _abstract(tensor=8))

    def test_cache_specs():
        for arch, spec_conv in (("mamba2", P(None, "data")), ("mamba1", P(None, "data", None,
                                                                          "tensor"))):
            config = CONFIGS[arch]()
            cache = jax.eval_shape(lambda config=config: lmj.empty_cache(config, 4))
            specs = lmj.sharding.cache_specs(cache, _abstract(data=2, tensor=2))
            assert specs.conv == spec_conv and specs.ssm == P(None, "data", "tensor")


if CHILD:
    from longmamba_jax.model import apply_model
    from longmamba_jax.sharding import make_mesh, shard, shard_cache

    MESHES = {
        "data8": dict(data=8),
        "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
        "data2_tensor4": dict(data=2, tensor=4),
    }
    ARCHS = list(CONFIGS)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def _tokens(config, batch=8, length=40, seed=0):
        return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))

    @functools.cache
    def _model(arch):
        return slow_decay(jax.jit(lambda: lmj.init_params(CONFIGS[arch](), seed=1))())

    def _cases(fast, *axes):
        """Every combination of the value lists `axes`, those not in `fast` marked slow."""
        import itertools

        return [c if c in fast else pytest.param(*c, marks=slow)
                for c in itertools.product(*axes)]

    def test_eight_devices():
        assert jax.device_count() == 8

    @pytest.mark.parametrize("arch,mesh_name,backend", _cases(
        {("mamba2", "data2_fsdp2_tensor2", "associative")},
        ARCHS, list(MESHES), ["associative", "pallas-interpret"]))
    def test_forward(arch, mesh_name, backend):
        model = _model(arch)
        tokens = _tokens(model.config)
        ref = lmj.forward(model, tokens, backend=backend)
        out = lmj.forward(shard(model, make_mesh(**MESHES[mesh_name])), tokens, backend=backend)
        assert rel(out, ref) < 1e-5
        assert out.sharding.spec[0] in (("data",), ("data", "fsdp"), "data")

    @slow
    @pytest.mark.parametrize("arch", ARCHS)
    def test_forward_padded_last_n(arch):
        """A padded batch (attention mask), the last position only."""
        model = _model(arch)
        tokens = _tokens(model.config)
        mask = np.ones(tokens.shape, np.int32)
        mask[::2, :7] = 0
        params = shard(model, make_mesh(**MESHES["data2_fsdp2_tensor2"]))
        ref = lmj.forward(model, tokens, backend="associative", attention_mask=mask, last_n=1)
        out = lmj.forward(params, tokens, backend="associative", attention_mask=mask, last_n=1)
        assert rel(out, ref) < 1e-5

    @slow
    def test_gated_norm_kernel_per_device():
        """Mamba2 with one group: the Pallas gated norm runs per device (data) and in jnp form
        under tensor parallelism (its norm spans all heads)."""
        config = lmj.Mamba2Config.tiny(d_model=64, headdim=16, ngroups=1)
        model = jax.jit(lambda: lmj.init_params(config, seed=2))()
        tokens = _tokens(config)
        ref = lmj.forward(model, tokens, backend="pallas-interpret")
        for shape in (dict(data=8), dict(data=4, tensor=2)):
            out = lmj.forward(shard(model, make_mesh(**shape)), tokens,
                              backend="pallas-interpret")
            assert rel(out, ref) < 1e-5, shape

    @pytest.mark.parametrize("arch", ARCHS)
    def test_kernels_run_under_shard_map(arch):
        """With a mesh in context the scan and conv calls are shard_maps (each device runs the
        kernel on its own batch rows and heads); without one, none."""
        model = _model(arch)
        mesh = make_mesh(data=2, tensor=4)
        params = shard(model, mesh)
        tokens = jnp.asarray(_tokens(model.config))
        backend = lmj.resolve_backend("pallas-interpret")

        def run(p, t):
            return apply_model(p, t, backend=backend).logits

        def count(jaxpr):
            return str(jaxpr).count("shard_map")

        with jax.set_mesh(mesh):
            sharded = jax.make_jaxpr(run)(params, tokens)
        assert count(jax.make_jaxpr(run)(model, tokens)) == 0
        assert count(sharded) >= 1

    def test_batch_not_divisible():
        model = _model("mamba2")
        params = shard(model, make_mesh(data=8))
        with pytest.raises(ValueError, match="batch 3 is not a multiple of the mesh's "
                                             "data-parallel size 8"):
            lmj.forward(params, _tokens(model.config, batch=3))

    @pytest.mark.parametrize("arch", ARCHS)
    def test_prefill_and_decode(arch):
        model = _model(arch)
        tokens = _tokens(model.config, length=24)
        ref_logits, ref_cache = lmj.prefill(model, tokens, backend="associative")
        mesh = make_mesh(**MESHES["data2_fsdp2_tensor2"])
        params = shard(model, mesh)
        logits, cache = lmj.prefill(params, tokens, backend="associative")
        assert rel(logits, ref_logits) < 1e-5 and rel(cache.ssm, ref_cache.ssm) < 1e-5
        cache = shard_cache(cache, mesh)
        assert cache.ssm.sharding.spec == P(None, ("data", "fsdp"), "tensor")
        tok = np.asarray(jnp.argmax(ref_logits, -1))
        for _ in range(3):
            ref_logits, ref_cache = lmj.decode_step(model, ref_cache, tok, donate=False)
            logits, cache = lmj.decode_step(params, cache, tok, donate=False)
            assert rel(logits, ref_logits) < 1e-5
            assert rel(cache.ssm, ref_cache.ssm) < 1e-5 and rel(cache.conv, ref_cache.conv) < 1e-5
            tok = np.asarray(jnp.argmax(ref_logits, -1))

    @pytest.mark.parametrize("arch,decode_impl,mesh_name", _cases(
        {("mamba2", "scan", "data8")},
        ARCHS, ["scan", "unrolled"], ["data8", "data2_fsdp2_tensor2"]))
    def test_generate(arch, decode_impl, mesh_name):
        model = _model(arch)
        tokens = _tokens(model.config, length=20, seed=3)
        kw = dict(max_new_tokens=6, backend="associative", return_logits=True,
                  decode_impl=decode_impl)
        ref = lmj.generate(model, tokens, **kw)
        out = lmj.generate(shard(model, make_mesh(**MESHES[mesh_name])), tokens, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        assert rel(out.logits, ref.logits) < 1e-5

    def test_fused_decode_refused_on_a_mesh():
        model = _model("mamba2")
        params = shard(model, make_mesh(data=8))
        with pytest.raises(ValueError, match="decode_impl='fused'"):
            lmj.generate(params, _tokens(model.config), max_new_tokens=2, decode_impl="fused")

    def _loss(params, tokens, backend):
        logits = apply_model(params, tokens[:, :-1], backend=backend).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    @slow
    @pytest.mark.parametrize("backend", ["associative", "pallas-interpret"])
    @pytest.mark.parametrize("arch", ARCHS)
    def test_grad_and_optimizer_step(arch, backend):
        """A jitted grad step and an Adam update on sharded params and a sharded optimizer
        state (FSDP: the moments sharded like their weights) equal the unsharded ones."""
        import optax

        model = _model(arch)
        backend = lmj.resolve_backend(backend)
        tokens = jnp.asarray(_tokens(model.config, length=17))
        # Adam's first step is g / (|g| + eps): with the default eps, the sign of gradients at
        # rounding level; a larger eps makes the update a smooth function of the gradient.
        opt = optax.adam(1e-2, eps=1e-3)

        @jax.jit
        def step(params, state, tokens):
            loss, grads = jax.value_and_grad(_loss)(params, tokens, backend)
            updates, state = opt.update(grads, state, params)
            return loss, grads, optax.apply_updates(params, updates), state

        ref_loss, ref_grads, ref_params, _ = step(model, opt.init(model), tokens)
        mesh = make_mesh(**MESHES["data2_fsdp2_tensor2"])
        params = shard(model, mesh)
        state = lmj.shard_train_state(opt.init(params), params, mesh)
        mu = state[0].mu.weights["layers"]["mixer"]["in_proj"]["kernel"]
        assert mu.sharding == params.weights["layers"]["mixer"]["in_proj"]["kernel"].sharding
        assert mu.sharding.spec == P(None, "fsdp", "tensor")
        assert state[0].count.sharding.spec == P()
        with jax.set_mesh(mesh):
            loss, grads, new_params, state = step(params, state, tokens)
        assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads.weights),
                                jax.tree.leaves(ref_grads.weights), strict=True):
            assert rel(g, r) < 1e-5, jax.tree_util.keystr(path)
        for p, r in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params), strict=True):
            assert rel(p, r) < 1e-5
        # the step kept the FSDP placement of the weights and the moments
        new_mu = state[0].mu.weights["layers"]["mixer"]["in_proj"]["kernel"]
        assert new_mu.sharding.spec == mu.sharding.spec
        kernel = new_params.weights["layers"]["mixer"]["in_proj"]["kernel"]
        assert kernel.sharding.spec == P(None, "fsdp", "tensor")

    def test_state_shardings_follow_weight_paths():
        model = _model("mamba1")
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        shardings = lmj.sharding.param_shardings(model, mesh)
        state = {"step": jnp.zeros((), jnp.int32), "params": model.weights,
                 "other": jnp.zeros((3,))}
        out = lmj.sharding.state_shardings(state, model, mesh)
        kernel = shardings.weights["layers"]["mixer"]["out_proj"]["kernel"]
        assert out["params"]["layers"]["mixer"]["out_proj"]["kernel"] == kernel
        assert out["step"] == NamedSharding(mesh, P()) == out["other"]

    def test_eval_cli_data_parallel(tmp_path):
        """--data-parallel 4 gives the single-device results (batches of 3 padded to 4)."""
        from longmamba_evals.tasks.cli import main

        results = {}
        for n in (1, 4):
            out = tmp_path / f"dp{n}"
            main(["perplexity", "--model", "tiny-random:mamba2", "--tokenizer", "bytes",
                  "--lengths", "96", "--windows", "3", "--eval-tokens", "8", "--batch-size", "3",
                  "--backend", "associative", "--no-progress", "--no-plot", "--out", str(out),
                  "--data-parallel", str(n)])
            results[n] = json.loads((out / "perplexity_vanilla.json").read_text())
        a, b = (results[n]["curves"]["perplexity"]["y"] for n in (1, 4))
        np.testing.assert_allclose(a, b, rtol=1e-5)
