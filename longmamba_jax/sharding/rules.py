"""Partition rules: which mesh axes split each weight and each cache array (docs/sharding.md,
"Partition rules").

A rule is (regex, PartitionSpec); a weight's path is its keys joined by "/" (paths mirror the
torch keys: "embedding/weight", "layers/mixer/in_proj/kernel", ...) and the first rule whose
regex matches the whole path gives its spec. Layer weights carry the stacked layer axis first,
which is never split (the layer scan slices it). Axis names the mesh lacks count as size 1.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longmamba_jax.config import Mamba2Config, MambaConfig
from longmamba_jax.sharding.mesh import AXES, FSDP, TENSOR, batch_axes, check_mesh

Rules = list  # [(regex str, PartitionSpec)]


def default_rules(config) -> Rules:
    """The rules for a model of this config.

    Vocabulary (embedding rows, head columns) and heads / channels (in_proj's output columns,
    out_proj's input rows, the per-channel vectors) over "tensor"; the model dimension of the
    large matrices over "fsdp"; norms and the Mamba2 conv (its channels are [x | B | C], not
    aligned with heads) replicated. Mamba2's in_proj columns [z | x | B | C | dt] are split in
    contiguous blocks: XLA moves the columns whose block is not their head's device after the
    projection (docs/sharding.md, "Tensor parallelism"). Hybrid models (attention layers)
    have no default rules: pass your own.
    """
    if not isinstance(config, (MambaConfig, Mamba2Config)):
        raise ValueError(f"no default partition rules for {type(config).__name__} (a model "
                         "with attention layers): pass rules=[(regex, PartitionSpec), ...] "
                         "that cover its weights (docs/sharding.md)")
    rules = [
        (r"embedding/weight", P(TENSOR, FSDP)),
        (r"lm_head/kernel", P(FSDP, TENSOR)),
        (r"norm_f/weight", P()),
        (r"layers/norm/weight", P()),
        (r"layers/mixer/in_proj/kernel", P(None, FSDP, TENSOR)),
        (r"layers/mixer/in_proj/bias", P(None, TENSOR)),
        (r"layers/mixer/out_proj/kernel", P(None, TENSOR, FSDP)),
        (r"layers/mixer/out_proj/bias", P()),
        (r"layers/mixer/(A_log|D)", P(None, TENSOR)),
        # per-output-channel scales of int8 kernels (`longmamba_jax.quantize`): split as the
        # kernels' output columns
        (r"lm_head/scale", P(TENSOR)),
        (r"layers/mixer/in_proj/scale", P(None, TENSOR)),
        (r"layers/mixer/out_proj/scale", P()),
    ]
    if isinstance(config, Mamba2Config):
        return rules + [
            (r"layers/mixer/dt_bias", P(None, TENSOR)),
            (r"layers/mixer/norm/weight", P(None, TENSOR)),
            (r"layers/mixer/conv1d/(kernel|bias)", P()),
        ]
    return rules + [
        (r"layers/mixer/conv1d/kernel", P(None, None, TENSOR)),
        (r"layers/mixer/conv1d/bias", P(None, TENSOR)),
        (r"layers/mixer/x_proj/kernel", P(None, (TENSOR, FSDP), None)),
        (r"layers/mixer/dt_proj/kernel", P(None, None, (TENSOR, FSDP))),
        (r"layers/mixer/dt_proj/bias", P(None, TENSOR)),
    ]


def weight_paths(weights: dict, prefix: str = ""):
    """(path "a/b/c", leaf) of a nested dict of weights, depth first in sorted key order."""
    for key in sorted(weights):
        value = weights[key]
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from weight_paths(value, path)
        else:
            yield path, value


def match_rules(weights: dict, rules: Rules) -> dict[str, P]:
    """{path: spec} of every weight; a weight no rule matches raises (naming all of them)."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    specs, missing = {}, []
    for path, _ in weight_paths(weights):
        spec = next((s for r, s in compiled if r.fullmatch(path)), None)
        if spec is None:
            missing.append(path)
        specs[path] = spec
    if missing:
        raise ValueError(f"no partition rule matches the weights {missing}; add a "
                         "(regex, PartitionSpec) for each to the rules")
    return specs


def fit_spec(spec: P, shape, mesh, what: str) -> P:
    """`spec` for an array of `shape` on `mesh`: axis names the mesh lacks are dropped (the
    library's axes only: an unknown name raises), and every split dimension must be divisible
    by its axes' total size."""
    if len(spec) > len(shape):
        raise ValueError(f"{what}: spec {spec} has {len(spec)} entries for shape {shape}")
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in names if a not in mesh.axis_names and a not in AXES]
        if unknown:
            raise ValueError(f"{what}: spec {spec} names axes {unknown} that the mesh "
                             f"{dict(mesh.shape)} does not have")
        names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(
                f"{what}: dimension {dim} of shape {tuple(shape)} is not divisible by mesh axes "
                f"{names} (size {size}) of spec {spec}; change the mesh or pass rules that "
                "replicate it")
        entries.append(None if not names else names[0] if len(names) == 1 else names)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def param_specs(params, mesh, rules: Rules | None = None):
    """`Params` of PartitionSpecs (one per weight), fitted to `mesh`."""
    check_mesh(mesh)
    rules = default_rules(params.config) if rules is None else list(rules)
    specs = match_rules(params.weights, rules)
    fitted = {path: fit_spec(specs[path], leaf.shape, mesh, path)
              for path, leaf in weight_paths(params.weights)}
    return dataclasses.replace(params, weights=_rebuild(params.weights, fitted))


def param_shardings(params, mesh, rules: Rules | None = None):
    """`Params` of `NamedSharding`s: for `jax.device_put`, jit's `out_shardings`, or an Orbax
    restore straight onto the mesh."""
    specs = param_specs(params, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def shard(params, mesh, rules: Rules | None = None):
    """Places a model's weights on `mesh` by the partition rules.

    Args:
      params: `Params` (from `load` or `init_params`).
      mesh: a `jax.sharding.Mesh` with axes among data, fsdp, seq, tensor (`make_mesh`).
      rules: [(regex, PartitionSpec)], first match on the whole path wins; None for
        `default_rules(params.config)`. Every weight must match a rule.

    Returns:
      `Params` whose arrays are placed on the mesh; `forward`, `prefill` and `generate` find
      the mesh there (docs/sharding.md).

    Raises:
      ValueError: a weight without a rule, a spec naming an unknown axis, or a split dimension
        that the mesh axes do not divide (named with its path and shape).
    """
    return jax.device_put(params, param_shardings(params, mesh, rules))


def cache_specs(cache, mesh):
    """`Cache` of PartitionSpecs: the batch over the data axes, the SSM state's heads /
    channels over "tensor" (Mamba-1's conv window too; Mamba2's conv channels [x | B | C] stay
    whole)."""
    check_mesh(mesh)
    b = batch_axes(mesh) or None
    mamba1 = cache.ssm.ndim == 4  # [L, b, e, n]; Mamba2 [L, b, h, p, n]
    conv = fit_spec(P(None, b, None, TENSOR if mamba1 else None), cache.conv.shape, mesh,
                    "cache.conv")
    ssm = fit_spec(P(None, b, TENSOR), cache.ssm.shape, mesh, "cache.ssm")
    return dataclasses.replace(cache, conv=conv, ssm=ssm)


def shard_cache(cache, mesh):
    """Places a decode `Cache` on `mesh` (`cache_specs`)."""
    specs = cache_specs(cache, mesh)
    return dataclasses.replace(
        cache, conv=jax.device_put(cache.conv, NamedSharding(mesh, specs.conv)),
        ssm=jax.device_put(cache.ssm, NamedSharding(mesh, specs.ssm)))


def _rebuild(weights: dict, by_path: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in weights.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out[key] = _rebuild(value, by_path, path) if isinstance(value, dict) else by_path[path]
    return out
