"""Shardings for training state: an optimizer state (optax) or any pytree that holds copies of
the weights gets each copy sharded like its weight (FSDP for the optimizer moments)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longmamba_jax.sharding.rules import Rules, param_specs, weight_paths


def state_shardings(state, params, mesh, rules: Rules | None = None):
    """A pytree like `state` of `NamedSharding`s.

    A leaf whose key path ends with a weight's path ("layers/mixer/in_proj/kernel", as in
    `optax.adam(...).init(params)`'s mu and nu, or a {"params": ..., "opt": ...} dict) and has
    that weight's shape gets the weight's sharding; every other leaf (step counts, scalars,
    factored moments of another shape) is replicated.

    Args:
      state: the pytree (e.g. an optax state).
      params: the `Params` the state was made for (its paths and shapes; arrays or
        `jax.ShapeDtypeStruct`s).
      mesh: the mesh; rules: as for `shard`.
    """
    specs = param_specs(params, mesh, rules)
    by_path = {path: (spec, tuple(leaf.shape)) for (path, spec), (_, leaf) in
               zip(weight_paths(specs.weights), weight_paths(params.weights), strict=True)}

    def sharding(key_path, leaf):
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(keys)):
            found = by_path.get("/".join(keys[i:]))
            if found is not None and found[1] == shape:
                return NamedSharding(mesh, found[0])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, state)


def shard_train_state(state, params, mesh, rules: Rules | None = None):
    """Places `state` on `mesh` by `state_shardings` (the weights themselves: `shard`)."""
    return jax.device_put(state, state_shardings(state, params, mesh, rules))
