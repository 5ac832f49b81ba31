"""Key tables of the hybrid families: transformers torch key <-> (parameter path, slot).

A stacked parameter group holds one slot per layer of its kind: `layers` (every Mamba2 layer,
slot = its index among the Mamba2 layers), Zamba2's `shared` (slot = block), `adapters` and
`linear` (slot = use), Bamba's `attn_layers` (slot = index among the attention layers).
Leaves follow the torch names; `kernel` is a Linear weight transposed, the conv kernel [K, C]
is the depthwise Conv1d weight [C, 1, K] (docs/design.md, "Checkpoint formats").

Zamba2 ties every use of a shared block to the block's first use (its "owner" layer):
transformers' save_pretrained writes the owner's keys only; copies under other layers are
accepted when they equal the owner's tensors (`match` flags them).
"""

from __future__ import annotations

import re

from longmamba_jax.hybrid.config import Zamba2Config

_NORMS = {"norm", "input_layernorm", "pre_ff_layernorm"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_ADAPTER = re.compile(
    r"(self_attn\.(linear_[qkv]_adapter)|feed_forward\.(gate_up_proj_adapter))_list\.(\d+)\."
    r"([01])\.weight")


def leaf_path(torch_leaf: str) -> tuple[tuple[str, ...], str]:
    """'self_attn.q_proj.weight' -> (('self_attn', 'q_proj', 'kernel'), 'linear'); the second
    element names the transform: 'linear' (transpose), 'conv' or 'same'."""
    *mods, name = torch_leaf.split(".")
    if name != "weight" or not mods:
        return (*mods, name), "same"
    if mods[-1] == "conv1d":
        return (*mods, "kernel"), "conv"
    if mods[-1] in _NORMS:
        return (*mods, "weight"), "same"
    return (*mods, "kernel"), "linear"


def _torch_leaf(path: tuple[str, ...]) -> str:
    return ".".join("weight" if p == "kernel" else p for p in path)


_TOP = {
    "model.embed_tokens.weight": (("embedding", "weight"), "same"),
    "model.final_layernorm.weight": (("norm_f", "weight"), "same"),
    "lm_head.weight": (("lm_head", "kernel"), "linear"),
}
_TOP_BACK = {path: key for key, (path, _) in _TOP.items()}


class HybridKeys:
    """The key table of one hybrid config (`match` for loading, `torch_key` for export)."""

    def __init__(self, config):
        self.config = config
        self.zamba2 = isinstance(config, Zamba2Config)
        if self.zamba2:
            self.uses = {layer: u for u, layer in enumerate(config.hybrid_layers)}
        else:
            self.mamba_slot = {layer: j for j, layer in enumerate(config.mamba_layers)}
            self.attn_slot = {layer: j for j, layer in enumerate(config.attention_layers)}

    def match(self, key: str):
        """(path, slot or None, transform name, is_copy) for a torch key, or None."""
        if key in _TOP:
            path, transform = _TOP[key]
            return path, None, transform, False
        m = _LAYER.fullmatch(key)
        if m is None or int(m.group(1)) >= self.config.n_layer:
            return None
        i, rest = int(m.group(1)), m.group(2)
        return self._zamba2(i, rest) if self.zamba2 else self._bamba(i, rest)

    def _zamba2(self, i: int, rest: str):
        cfg = self.config
        prefix = "mamba_decoder." if i in self.uses else ""
        if rest == prefix + "input_layernorm.weight":
            return ("layers", "norm", "weight"), i, "same", False
        if rest.startswith(prefix + "mamba."):
            path, transform = leaf_path(rest[len(prefix) + 6:])
            return ("layers", "mixer", *path), i, transform, False
        if i not in self.uses:
            return None
        u = self.uses[i]
        if rest == "linear.weight":
            return ("linear", "kernel"), u, "linear", False
        if not rest.startswith("shared_transformer."):
            return None
        sub = rest[len("shared_transformer."):]
        block = u % cfg.num_mem_blocks
        copy = i != cfg.hybrid_layers[block]
        a = _ADAPTER.fullmatch(sub)
        if a is not None:
            name, j = a.group(2) or a.group(3), int(a.group(4))
            if j >= cfg.n_uses or j % cfg.num_mem_blocks != block or (
                    name.startswith("linear_") and not cfg.attn_adapters):
                return None
            return ("adapters", name, a.group(5), "kernel"), j, "linear", copy
        path, transform = leaf_path(sub)
        return ("shared", *path), block, transform, copy

    def _bamba(self, i: int, rest: str):
        if i in self.mamba_slot:
            slot, group = self.mamba_slot[i], "layers"
            if rest == "input_layernorm.weight":
                return ("layers", "norm", "weight"), slot, "same", False
            if rest.startswith("mamba."):
                path, transform = leaf_path(rest[6:])
                return ("layers", "mixer", *path), slot, transform, False
            if rest.startswith("self_attn."):
                return None
        else:
            slot, group = self.attn_slot[i], "attn_layers"
            if rest.startswith("mamba."):
                return None
        path, transform = leaf_path(rest)
        return (group, *path), slot, transform, False

    def torch_key(self, path: tuple[str, ...], slot: int | None) -> str:
        """The torch key of parameter `path` (slot `slot` of a stacked group)."""
        if path in _TOP_BACK:
            return _TOP_BACK[path]
        cfg, group = self.config, path[0]
        if self.zamba2:
            if group == "layers":
                prefix = f"model.layers.{slot}." + ("mamba_decoder." if slot in self.uses else "")
                if path[1] == "norm":
                    return prefix + "input_layernorm.weight"
                return prefix + "mamba." + _torch_leaf(path[2:])
            if group == "shared":
                return f"model.layers.{cfg.hybrid_layers[slot]}.shared_transformer." \
                       f"{_torch_leaf(path[1:])}"
            if group == "linear":
                return f"model.layers.{cfg.hybrid_layers[slot]}.linear.weight"
            if group == "adapters":
                owner = cfg.hybrid_layers[slot % cfg.num_mem_blocks]
                sub = "self_attn" if path[1].startswith("linear_") else "feed_forward"
                return f"model.layers.{owner}.shared_transformer.{sub}.{path[1]}_list.{slot}." \
                       f"{path[2]}.weight"
        else:
            if group == "layers":
                i = cfg.mamba_layers[slot]
                if path[1] == "norm":
                    return f"model.layers.{i}.input_layernorm.weight"
                if path[1] == "mixer":
                    return f"model.layers.{i}.mamba.{_torch_leaf(path[2:])}"
                return f"model.layers.{i}.{_torch_leaf(path[1:])}"
            if group == "attn_layers":
                return f"model.layers.{cfg.attention_layers[slot]}.{_torch_leaf(path[1:])}"
        raise KeyError(f"no torch key for parameter {'/'.join(path)}")
