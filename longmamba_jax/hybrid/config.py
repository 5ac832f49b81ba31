"""Configurations of the hybrid families (Mamba2 layers + attention), from transformers configs.

- `Zamba2Config`: n_layer Mamba2 layers; before each layer marked "h" in `layer_pattern`, one
  of `num_mem_blocks` shared transformer blocks (attention + MLP over [h, embedding], with
  per-use LoRA adapters) and a per-use linear whose output is added to that layer's input.
- `BambaConfig`: n_layer decoder layers, each a Mamba2 mixer ("m") or an attention mixer ("a")
  followed by a SwiGLU MLP, both residual.

Both keep the shared `_Common` fields (d_model, n_layer, vocab, the Mamba2 geometry, norm_eps,
tie_embeddings) and derive the `Mamba2Config` their Mamba2 layers run with (`.mamba`). See
docs/families.md for how each maps onto the shared layers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from longmamba_jax.config import ConfigError, Mamba2Config, _Common, _float, _limit, _require

_INF = float("inf")

# transformers activation names -> what `hybrid.layers.activation` computes
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "swish", "relu")


def _check_attention(cfg, head_dim: int) -> None:
    if cfg.n_heads < 1 or cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"n_kv_heads ({cfg.n_kv_heads}) must divide n_heads ({cfg.n_heads})")
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"the attention head_dim must be even and >= 2, got {head_dim}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={cfg.hidden_act!r} is not supported (one of {ACTIVATIONS})")


def _check_mamba(cfg) -> None:
    if cfg.mamba_nheads < 1 or cfg.d_inner % cfg.mamba_nheads:
        raise ConfigError(f"the Mamba2 head count {cfg.mamba_nheads} must divide expand·d_model "
                          f"= {cfg.d_inner}")
    if cfg.ngroups < 1 or cfg.mamba_nheads % cfg.ngroups:
        raise ConfigError(f"ngroups ({cfg.ngroups}) must divide the Mamba2 head count "
                          f"({cfg.mamba_nheads})")


def _check_pattern(cfg, kinds: str) -> None:
    if len(cfg.layer_pattern) != cfg.n_layer or set(cfg.layer_pattern) - set(kinds):
        raise ConfigError(f"layer_pattern must have one of {list(kinds)} per layer "
                          f"({cfg.n_layer}), got {cfg.layer_pattern!r}")


@dataclasses.dataclass(frozen=True)
class Zamba2Config(_Common):
    """Zamba2: Mamba2 layers with shared transformer blocks (transformers `Zamba2Config`).

    layer_pattern: one character per layer, "m" (Mamba2 layer) or "h" (shared block, then the
      Mamba2 layer); the i-th "h" is use i, served by shared block i mod num_mem_blocks.
    The attention runs on [h, embedding] (2·d_model wide): head_dim = 2·d_model / n_heads, logits
    scaled by (head_dim / 2)^-1/2. `bias` (add_bias_linear) covers the Mamba2 in/out projections
    and the MLP; the Mamba2 conv always has a bias; Δ is clamped below at `dt_min`.
    """

    d_state: int = 64
    layer_pattern: str = ""
    mamba_nheads: int = 8
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 0  # 0: 4·d_model
    hidden_act: str = "gelu"
    num_mem_blocks: int = 1
    attn_adapters: bool = False
    adapter_rank: int = 128
    use_rope: bool = False
    rope_theta: float = 10000.0
    pad_vocab_size_multiple: int = 1

    arch: ClassVar[str] = "zamba2"

    def __post_init__(self):
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.d_model)
        self._validate()
        _check_pattern(self, "mh")
        _check_mamba(self)
        if 2 * self.d_model % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide 2·d_model "
                              f"({2 * self.d_model})")
        _check_attention(self, self.head_dim)
        if self.attn_adapters and self.n_kv_heads != self.n_heads:
            raise ConfigError("the shared attention adapters (use_shared_attention_adapter) "
                              f"need n_kv_heads == n_heads, got {self.n_kv_heads} and "
                              f"{self.n_heads}")
        if self.num_mem_blocks < 1 or self.adapter_rank < 1 or self.ffn_dim < 1:
            raise ConfigError("num_mem_blocks, adapter_rank and ffn_dim must be positive, got "
                              f"{self.num_mem_blocks}, {self.adapter_rank}, {self.ffn_dim}")

    @property
    def head_dim(self) -> int:
        return 2 * self.d_model // self.n_heads

    @property
    def hybrid_layers(self) -> tuple[int, ...]:
        """Indices of the layers that a shared block precedes (use u = position in this tuple)."""
        return tuple(i for i, c in enumerate(self.layer_pattern) if c == "h")

    @property
    def n_uses(self) -> int:
        return len(self.hybrid_layers)

    @property
    def n_blocks(self) -> int:
        """Shared blocks with weights (a block no use reaches has none)."""
        return min(self.num_mem_blocks, self.n_uses)

    @property
    def n_kv_caches(self) -> int:
        return self.n_uses

    @property
    def channels(self) -> int:
        return self.mamba_nheads

    @property
    def mamba(self) -> Mamba2Config:
        """The Mamba2 geometry of every layer (its gated norm's epsilon is fixed at 1e-5)."""
        return Mamba2Config(
            d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab_size,
            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, conv_bias=True,
            bias=self.bias, pad_vocab_size_multiple=self.pad_vocab_size_multiple,
            tie_embeddings=self.tie_embeddings, norm_eps=1e-5,
            headdim=self.d_inner // self.mamba_nheads, ngroups=self.ngroups,
            chunk_size=self.chunk_size, dt_limit=(self.dt_min, _INF),
        )

    @classmethod
    def tiny(cls, **overrides) -> Zamba2Config:
        base = dict(d_model=32, n_layer=5, vocab_size=67, layer_pattern="mhmhh", d_state=8,
                    mamba_nheads=4, chunk_size=8, n_heads=4, n_kv_heads=4, ffn_dim=48,
                    num_mem_blocks=2, attn_adapters=True, adapter_rank=4, use_rope=True)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class BambaConfig(_Common):
    """Bamba: decoder layers of a Mamba2 or attention mixer, each followed by a SwiGLU MLP
    (transformers `BambaConfig`).

    layer_pattern: one character per layer, "m" (Mamba2) or "a" (attention). Attention:
    head_dim = d_model / n_heads, rotary embeddings on the first partial_rotary_factor·head_dim
    dimensions of each head. The Mamba2 gated norm uses norm_eps, like every other norm.
    """

    d_state: int = 256
    layer_pattern: str = ""
    mamba_nheads: int = 128
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, _INF)
    n_heads: int = 32
    n_kv_heads: int = 8
    attn_bias: bool = False
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    ffn_dim: int = 14336
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_embeddings: bool = False
    pad_vocab_size_multiple: int = 1

    arch: ClassVar[str] = "bamba"

    def __post_init__(self):
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        self._validate()
        _check_pattern(self, "ma")
        _check_mamba(self)
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        _check_attention(self, self.head_dim)
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={self.hidden_act!r}: Bamba's Mamba2 conv uses it, "
                              "only 'silu' is supported")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives an odd "
                              f"or empty rotary dimension ({self.rotary_dim})")
        if self.ffn_dim < 1:
            raise ConfigError(f"ffn_dim must be positive, got {self.ffn_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.layer_pattern) if c == "a")

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.layer_pattern) if c == "m")

    @property
    def n_ssm_layer(self) -> int:
        return len(self.mamba_layers)

    @property
    def n_kv_caches(self) -> int:
        return len(self.attention_layers)

    @property
    def channels(self) -> int:
        return self.mamba_nheads

    @property
    def mamba(self) -> Mamba2Config:
        return Mamba2Config(
            d_model=self.d_model, n_layer=max(self.n_ssm_layer, 1), vocab_size=self.vocab_size,
            d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
            conv_bias=self.conv_bias, bias=self.bias,
            pad_vocab_size_multiple=self.pad_vocab_size_multiple,
            tie_embeddings=self.tie_embeddings, norm_eps=self.norm_eps,
            headdim=self.d_inner // self.mamba_nheads, ngroups=self.ngroups,
            chunk_size=self.chunk_size, dt_limit=self.dt_limit,
        )

    @classmethod
    def tiny(cls, **overrides) -> BambaConfig:
        base = dict(d_model=32, n_layer=4, vocab_size=67, layer_pattern="mmam", d_state=8,
                    mamba_nheads=4, chunk_size=8, n_heads=4, n_kv_heads=2, ffn_dim=48)
        base.update(overrides)
        return cls(**base)


HYBRID_CONFIGS = {"zamba2": Zamba2Config, "bamba": BambaConfig}
HybridConfig = Zamba2Config | BambaConfig


# ---------------------------------------------------------------------------------------------
# transformers configs.

def _rope_theta(cfg: dict, source: str) -> float:
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ConfigError(f"{source}: only the default rotary embedding is supported, got "
                          f"rope_parameters={rope!r} rope_scaling={cfg.get('rope_scaling')!r}")
    return _float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta", source)


_ZAMBA2_LAYER_KINDS = {"mamba": "m", "linear_attention": "m", "m": "m", "hybrid": "h", "g": "h"}


def _zamba2(cfg: dict, source: str) -> Zamba2Config:
    d_model = int(_require(cfg, "hidden_size", source))
    n_layer = int(_require(cfg, "num_hidden_layers", source))
    kinds = cfg.get("layers_block_type")
    if kinds is None:
        raise ConfigError(f"{source}: missing required key 'layers_block_type' (which layers a "
                          "shared transformer block precedes)")
    bad = [k for k in kinds if k not in _ZAMBA2_LAYER_KINDS]
    if bad:
        raise ConfigError(f"{source}: layers_block_type holds {bad[0]!r}; expected 'mamba' / "
                          "'linear_attention' or 'hybrid'")
    heads = int(cfg.get("num_attention_heads", 32))
    mamba_heads = int(cfg.get("n_mamba_heads", 8))
    expand = int(cfg.get("mamba_expand", 2))
    headdim = cfg.get("mamba_headdim")
    if headdim is not None and int(headdim) * mamba_heads != expand * d_model:
        raise ConfigError(f"{source}: mamba_headdim={headdim} but mamba_expand·hidden_size / "
                          f"n_mamba_heads = {expand * d_model / mamba_heads:g}")
    return Zamba2Config(
        d_model=d_model, n_layer=n_layer, vocab_size=int(_require(cfg, "vocab_size", source)),
        layer_pattern="".join(_ZAMBA2_LAYER_KINDS[k] for k in kinds),
        d_state=int(cfg.get("mamba_d_state", 64)), d_conv=int(cfg.get("mamba_d_conv", 4)),
        expand=expand, mamba_nheads=mamba_heads, ngroups=int(cfg.get("mamba_ngroups", 1)),
        chunk_size=int(cfg.get("chunk_size", 256)),
        dt_min=_float(cfg.get("time_step_min", 0.001), "time_step_min", source),
        bias=bool(cfg.get("add_bias_linear", False)), conv_bias=True,
        n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        ffn_dim=int(cfg.get("intermediate_size") or 4 * d_model),
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        num_mem_blocks=int(cfg.get("num_mem_blocks", 1)),
        attn_adapters=bool(cfg.get("use_shared_attention_adapter", False)),
        adapter_rank=int(cfg.get("adapter_rank", 128)),
        use_rope=bool(cfg.get("use_mem_rope", False)), rope_theta=_rope_theta(cfg, source),
        norm_eps=_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def _bamba(cfg: dict, source: str) -> BambaConfig:
    d_model = int(_require(cfg, "hidden_size", source))
    n_layer = int(_require(cfg, "num_hidden_layers", source))
    attn = cfg.get("attn_layer_indices") or []
    if any(not isinstance(i, int) or not 0 <= i < n_layer for i in attn):
        raise ConfigError(f"{source}: attn_layer_indices={attn} must be layer indices below "
                          f"num_hidden_layers={n_layer}")
    expand = int(cfg.get("mamba_expand", 2))
    mamba_heads = int(cfg.get("mamba_n_heads", 128))
    d_head = cfg.get("mamba_d_head", "auto")
    if d_head != "auto" and int(d_head) * mamba_heads != expand * d_model:
        raise ConfigError(f"{source}: mamba_d_head={d_head} but mamba_expand·hidden_size / "
                          f"mamba_n_heads = {expand * d_model / mamba_heads:g}")
    if cfg.get("num_experts", 1) not in (1, None):
        raise ConfigError(f"{source}: num_experts={cfg['num_experts']} (mixture of experts) is "
                          "not supported")
    heads = int(cfg.get("num_attention_heads", 32))
    limit = cfg.get("time_step_limit")
    return BambaConfig(
        d_model=d_model, n_layer=n_layer, vocab_size=int(_require(cfg, "vocab_size", source)),
        layer_pattern="".join("a" if i in attn else "m" for i in range(n_layer)),
        d_state=int(cfg.get("mamba_d_state", 256)), d_conv=int(cfg.get("mamba_d_conv", 4)),
        expand=expand, mamba_nheads=mamba_heads, ngroups=int(cfg.get("mamba_n_groups", 1)),
        chunk_size=int(cfg.get("mamba_chunk_size", 256)),
        dt_limit=(0.0, _INF) if limit is None else _limit(limit, "time_step_limit", source),
        conv_bias=bool(cfg.get("mamba_conv_bias", True)),
        bias=bool(cfg.get("mamba_proj_bias", False)),
        n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        attn_bias=bool(cfg.get("attention_bias", False)), rope_theta=_rope_theta(cfg, source),
        ffn_dim=int(cfg.get("intermediate_size", 14336)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), hidden_act=str(cfg.get("hidden_act", "silu")),
        norm_eps=_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def from_hf_hybrid(cfg: dict, source: str = "config.json") -> HybridConfig:
    """A `Zamba2Config` / `BambaConfig` from a transformers config dict."""
    parse = {"zamba2": _zamba2, "bamba": _bamba}[cfg["model_type"]]
    try:
        return parse(cfg, source)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError) and str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from None


def to_hf_hybrid(config: HybridConfig) -> dict:
    """The transformers config dict of a hybrid config (`vocab_size` is the padded size)."""
    common = {
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": config.hidden_act,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.ffn_dim, "mamba_d_state": config.d_state,
        "mamba_d_conv": config.d_conv, "mamba_expand": config.expand,
    }
    if isinstance(config, Zamba2Config):
        return {
            "architectures": ["Zamba2ForCausalLM"], "model_type": "zamba2", **common,
            "layers_block_type": ["hybrid" if c == "h" else "mamba"
                                  for c in config.layer_pattern],
            "n_mamba_heads": config.mamba_nheads, "mamba_ngroups": config.ngroups,
            "chunk_size": config.chunk_size, "time_step_min": config.dt_min,
            "add_bias_linear": config.bias, "num_mem_blocks": config.num_mem_blocks,
            "use_shared_attention_adapter": config.attn_adapters,
            "adapter_rank": config.adapter_rank, "use_mem_rope": config.use_rope,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        }
    return {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba", **common,
        "attn_layer_indices": list(config.attention_layers),
        "mamba_n_heads": config.mamba_nheads, "mamba_d_head": config.d_inner // config.mamba_nheads,
        "mamba_n_groups": config.ngroups, "mamba_chunk_size": config.chunk_size,
        "mamba_conv_bias": config.conv_bias, "mamba_proj_bias": config.bias,
        "time_step_limit": list(config.dt_limit),
        "attention_bias": config.attn_bias, "mlp_bias": config.mlp_bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": config.partial_rotary_factor},
    }
