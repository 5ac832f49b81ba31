"""Running a model on several devices (docs/sharding.md).

    mesh = lmj.make_mesh(data=2, tensor=4)        # axes data × fsdp × seq × tensor
    params = lmj.shard(params, mesh)              # weights placed by the partition rules
    logits = lmj.forward(params, tokens)          # batch over "data", heads over "tensor"
    logits, cache = lmj.prefill_context_parallel(params, tokens, lmj.make_mesh(seq=8))

- `mesh.py`: `make_mesh`, the axis names, placing a batch;
- `rules.py`: the partition rules of the weights and the decode cache (`shard`, `shard_cache`);
- `kernels.py`: the kernels under `shard_map` (what the mixers call);
- `context_parallel.py`: one long prompt split along the sequence over devices;
- `train.py`: shardings of an optimizer state.
"""

from longmamba_jax.sharding.mesh import (
    AXES,
    BATCH_AXES,
    DATA,
    FSDP,
    SEQ,
    TENSOR,
    make_mesh,
    mesh_of,
    place_batch,
)
from longmamba_jax.sharding.rules import (
    cache_specs,
    default_rules,
    param_shardings,
    param_specs,
    shard,
    shard_cache,
)
from longmamba_jax.sharding.train import shard_train_state, state_shardings

__all__ = [
    "AXES", "BATCH_AXES", "cache_specs", "DATA", "default_rules", "forward_context_parallel",
    "FSDP", "make_mesh", "mesh_of", "param_shardings", "param_specs", "place_batch",
    "prefill_context_parallel", "SEQ", "shard", "shard_cache", "shard_train_state",
    "state_shardings", "TENSOR",
]


def __getattr__(name):
    # context_parallel.py runs the model (imports longmamba_jax.model, which imports the
    # mixers, which import kernels.py from here): loaded on first use.
    if name in ("prefill_context_parallel", "forward_context_parallel"):
        from longmamba_jax.sharding import context_parallel

        return getattr(context_parallel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
