"""Model configurations for Mamba-1 and Mamba2, built from either checkpoint schema.

Two schemas exist in the wild (docs/design.md, "Checkpoint formats"):
- mamba_ssm native `config.json`: `d_model, n_layer, vocab_size, ssm_cfg{layer: "Mamba2", ...},
  rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings,
  d_intermediate, attn_layer_idx, attn_cfg`. Mixer geometry is mostly omitted and takes
  mamba_ssm's defaults (applied here, then cross-checked against tensor shapes by the loader).
- transformers `MambaConfig` / `Mamba2Config`: `hidden_size, num_hidden_layers, state_size,
  expand, conv_kernel, time_step_rank / head_dim, num_heads, n_groups, chunk_size, ...`.

Both become one frozen dataclass per architecture. Unsupported features (attention layers, a
gated MLP, LayerNorm instead of RMSNorm, ...) fail here with one message naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar

_INF = float("inf")


def _round_up(value: int, multiple: int) -> int:
    return value if multiple <= 1 else -(-value // multiple) * multiple


class ConfigError(ValueError):
    """A checkpoint config that is unknown, inconsistent or asks for something unsupported."""


@dataclasses.dataclass(frozen=True)
class _Common:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int
    d_conv: int = 4
    expand: int = 2
    conv_bias: bool = True
    bias: bool = False
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    norm_eps: float = 1e-5

    arch: ClassVar[str]

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_vocab_size_multiple)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (inf written as the string "inf"); `from_dict` reads it back."""
        out = {"arch": self.arch}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v if math.isfinite(v) else str(v) for v in value]
            out[f.name] = value
        return out

    @property
    def fingerprint(self) -> str:
        """A short stable hash of the architecture (not the weights): what a calibration or a
        converted checkpoint is matched against."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def family(self) -> str:
        """The model family ("mamba1", "mamba2", "falcon_mamba", "zamba2", "bamba")."""
        return self.arch

    @property
    def n_ssm_layer(self) -> int:
        """Layers with an SSM mixer: what a LongMamba `Calibration` is indexed by."""
        return self.n_layer

    def _validate(self) -> None:
        self._positive_ints("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand")
        if self.d_conv > MAX_D_CONV:  # the taps are unrolled; released models use 4
            raise ConfigError(f"d_conv must be at most {MAX_D_CONV} (the causal conv's width), "
                              f"got {self.d_conv}")
        if self.pad_vocab_size_multiple < 1:
            raise ConfigError(
                f"pad_vocab_size_multiple must be >= 1, got {self.pad_vocab_size_multiple}"
            )

    def _positive_ints(self, *names: str) -> None:
        """ConfigError unless each named field is an int > 0 (a bool is not one)."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


MAX_D_CONV = 64


@dataclasses.dataclass(frozen=True)
class MambaConfig(_Common):
    """Mamba-1 (S6). Channels that own a Δ: `d_inner` = expand·d_model.

    `mixer_rms_eps` set (FalconMamba): Δ's low-rank input, B and C each pass through a
    weightless RMSNorm with this epsilon right after x_proj (docs/families.md, "FalconMamba").
    """

    d_state: int = 16
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    mixer_rms_eps: float | None = None

    arch: ClassVar[str] = "mamba1"

    def __post_init__(self):
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        self._validate()
        if self.dt_rank <= 0:
            raise ConfigError(f"dt_rank must be positive, got {self.dt_rank}")
        if self.mixer_rms_eps is not None and not float(self.mixer_rms_eps) > 0:
            raise ConfigError(f"mixer_rms_eps must be positive, got {self.mixer_rms_eps}")

    @property
    def family(self) -> str:
        return "mamba1" if self.mixer_rms_eps is None else "falcon_mamba"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.mixer_rms_eps is None:  # plain Mamba-1: the dict (and fingerprint) predate it
            del out["mixer_rms_eps"]
        return out

    @property
    def channels(self) -> int:
        """Units that own a Δ: the d_inner channels."""
        return self.d_inner

    @property
    def conv_dim(self) -> int:
        return self.d_inner

    @classmethod
    def tiny(cls, **overrides) -> MambaConfig:
        base = dict(d_model=16, n_layer=2, vocab_size=61, d_state=4, pad_vocab_size_multiple=8)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(_Common):
    """Mamba2 (SSD). Channels that own a Δ: the `nheads` heads of `headdim` each."""

    d_state: int = 128
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, _INF)
    pad_vocab_size_multiple: int = 16

    arch: ClassVar[str] = "mamba2"

    def __post_init__(self):
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        self._validate()
        self._positive_ints("headdim", "ngroups", "chunk_size")
        if self.d_inner % self.headdim:
            raise ConfigError(
                f"d_inner = expand·d_model = {self.d_inner} is not a multiple of headdim "
                f"{self.headdim}"
            )
        if self.ngroups < 1 or self.nheads % self.ngroups:
            raise ConfigError(
                f"ngroups must divide nheads ({self.nheads}), got ngroups={self.ngroups}"
            )
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if len(self.dt_limit) != 2 or not self.dt_limit[0] <= self.dt_limit[1]:
            raise ConfigError(f"dt_limit must be (low, high) with low <= high, got {self.dt_limit}")

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def channels(self) -> int:
        """Units that own a Δ: the heads."""
        return self.nheads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @classmethod
    def tiny(cls, **overrides) -> Mamba2Config:
        base = dict(
            d_model=32, n_layer=2, vocab_size=61, d_state=8, headdim=16, ngroups=1, chunk_size=8,
        )
        base.update(overrides)
        return cls(**base)


Config = MambaConfig | Mamba2Config


def tiny_config(family: str, **overrides):
    """A tiny config of a model family ("mamba1", "mamba2", "falcon_mamba", "zamba2", "bamba"),
    for tests and `tiny-random:FAMILY` models."""
    from longmamba_jax.hybrid.config import BambaConfig, Zamba2Config

    makers = {"mamba1": MambaConfig.tiny, "mamba2": Mamba2Config.tiny,
              "falcon_mamba": lambda **kw: MambaConfig.tiny(**{"mixer_rms_eps": 1e-6, **kw}),
              "zamba2": Zamba2Config.tiny, "bamba": BambaConfig.tiny}
    if family not in makers:
        raise ConfigError(f"unknown model family {family!r} (one of {sorted(makers)})")
    return makers[family](**overrides)

# ---------------------------------------------------------------------------------------------
# Parsing the checkpoint schemas.

_NATIVE_KNOWN = {
    "d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
    "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate",
    "attn_layer_idx", "attn_cfg", "norm_epsilon",
}
# ssm_cfg keys that only matter for initialisation or for the CUDA fast path.
_NATIVE_IGNORED_SSM = {
    "layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range",
    "use_fast_path", "layer_idx", "device", "dtype", "activation", "process_group",
    "sequence_parallel",
}


def _float(value, key: str, source: str) -> float:
    """A JSON float; transformers >= 5 writes inf as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} holds {value!r}, not a number") from None


def _limit(value, key: str, source: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{source}: {key} must be [low, high], got {value!r}")
    return tuple(_float(v, key, source) for v in value)


def _require(cfg: dict, key: str, source: str):
    if key not in cfg:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return cfg[key]


def from_native_config(cfg: dict, source: str = "config.json") -> Config:
    """Builds a config from a mamba_ssm native `config.json` dict."""
    unknown = set(cfg) - _NATIVE_KNOWN
    if unknown:
        raise ConfigError(f"{source}: unknown mamba_ssm config keys {sorted(unknown)}")
    if cfg.get("d_intermediate", 0):
        raise ConfigError(
            f"{source}: d_intermediate={cfg['d_intermediate']} (a gated MLP in every block) is "
            "not supported"
        )
    if cfg.get("attn_layer_idx"):
        raise ConfigError(
            f"{source}: attention layers (attn_layer_idx={cfg['attn_layer_idx']}) are not "
            "supported"
        )
    if not cfg.get("rms_norm", True):
        raise ConfigError(f"{source}: rms_norm=false (LayerNorm blocks) is not supported")
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    common = dict(
        d_model=int(_require(cfg, "d_model", source)),
        n_layer=int(_require(cfg, "n_layer", source)),
        vocab_size=int(_require(cfg, "vocab_size", source)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        pad_vocab_size_multiple=int(cfg.get("pad_vocab_size_multiple", 8)),
        tie_embeddings=bool(cfg.get("tie_embeddings", True)),
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
    )
    if layer == "Mamba1":
        allowed = _NATIVE_IGNORED_SSM | {"d_state", "d_conv", "expand", "dt_rank", "conv_bias",
                                         "bias"}
        bad = set(ssm) - allowed
        if bad:
            raise ConfigError(f"{source}: unsupported Mamba1 ssm_cfg keys {sorted(bad)}")
        dt_rank = ssm.get("dt_rank", "auto")
        return MambaConfig(
            **common,
            d_state=int(ssm.get("d_state", 16)),
            d_conv=int(ssm.get("d_conv", 4)),
            expand=int(ssm.get("expand", 2)),
            dt_rank=None if dt_rank == "auto" else int(dt_rank),
            conv_bias=bool(ssm.get("conv_bias", True)),
            bias=bool(ssm.get("bias", False)),
        )
    if layer == "Mamba2":
        allowed = _NATIVE_IGNORED_SSM | {
            "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_limit",
            "conv_bias", "bias", "rmsnorm", "norm_before_gate", "D_has_hdim", "d_ssm",
            "conv_init",
        }
        bad = set(ssm) - allowed
        if bad:
            raise ConfigError(f"{source}: unsupported Mamba2 ssm_cfg keys {sorted(bad)}")
        for key, supported in (("rmsnorm", True), ("norm_before_gate", False),
                               ("D_has_hdim", False), ("d_ssm", None)):
            if key in ssm and ssm[key] != supported:
                raise ConfigError(
                    f"{source}: ssm_cfg.{key}={ssm[key]!r} is not supported (only {supported!r})"
                )
        return Mamba2Config(
            **common,
            d_state=int(ssm.get("d_state", 128)),
            d_conv=int(ssm.get("d_conv", 4)),
            expand=int(ssm.get("expand", 2)),
            headdim=int(ssm.get("headdim", 64)),
            ngroups=int(ssm.get("ngroups", 1)),
            chunk_size=int(ssm.get("chunk_size", 256)),
            dt_limit=_limit(ssm.get("dt_limit", (0.0, _INF)), "ssm_cfg.dt_limit", source),
            conv_bias=bool(ssm.get("conv_bias", True)),
            bias=bool(ssm.get("bias", False)),
        )
    raise ConfigError(f"{source}: ssm_cfg.layer={layer!r} is not Mamba1 or Mamba2")


_MISTRAL_KEYS = {"dim", "n_layers", "vocab_size", "n_groups", "rms_norm", "residual_in_fp32",
                 "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings", "model_type"}


def from_mistral_params(cfg: dict, source: str = "params.json") -> Mamba2Config:
    """Builds the `Mamba2Config` of a Codestral Mamba release (`params.json`, mistral-inference's
    `MambaArgs`): a mamba_ssm Mamba2 model with its default mixer geometry and `n_groups`."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    unknown = set(cfg) - _MISTRAL_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown Codestral Mamba params keys {sorted(unknown)}")
    if cfg.get("model_type", "mamba") != "mamba":
        raise ConfigError(f"{source}: model_type={cfg['model_type']!r} (expected 'mamba')")
    native = {
        "d_model": _require(cfg, "dim", source), "n_layer": _require(cfg, "n_layers", source),
        "vocab_size": _require(cfg, "vocab_size", source),
        "ssm_cfg": {"layer": "Mamba2", "ngroups": int(cfg.get("n_groups", 1))},
        **{k: cfg[k] for k in ("rms_norm", "residual_in_fp32", "fused_add_norm",
                               "pad_vocab_size_multiple", "tie_embeddings") if k in cfg},
    }
    return from_native_config(native, source)


# transformers model types that hold Mamba layers but are not supported, with the reason.
_HF_UNSUPPORTED = {
    "jamba": "Jamba (Mamba-1 + attention + mixture-of-experts layers)",
    "falcon_h1": "Falcon-H1 (attention and Mamba2 in parallel in every layer, muP multipliers)",
    "nemotron_h": "Nemotron-H (Mamba2 / attention / MLP / MoE blocks)",
    "granitemoehybrid": "GraniteMoeHybrid (Mamba2 + attention + mixture-of-experts layers)",
    "zamba": "Zamba (Mamba-1 + one shared attention block)",
}
HF_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "zamba2", "bamba")


def from_hf_config(cfg: dict, source: str = "config.json"):
    """Builds a config from a transformers config dict: `MambaConfig` for mamba and
    falcon_mamba, `Mamba2Config` for mamba2, the hybrid configs of `longmamba_jax.hybrid` for
    zamba2 and bamba."""
    model_type = cfg.get("model_type")
    if model_type in ("zamba2", "bamba"):
        from longmamba_jax.hybrid.config import from_hf_hybrid

        return from_hf_hybrid(cfg, source)
    if model_type in _HF_UNSUPPORTED:
        raise ConfigError(f"{source}: model_type={model_type!r} ({_HF_UNSUPPORTED[model_type]}) "
                          f"is not supported; supported: {', '.join(HF_MODEL_TYPES)}")
    if model_type not in ("mamba", "mamba2", "falcon_mamba"):
        raise ConfigError(f"{source}: model_type={model_type!r} is not a supported Mamba model "
                          f"(one of {', '.join(HF_MODEL_TYPES)})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    common = dict(
        d_model=int(_require(cfg, "hidden_size", source)),
        n_layer=int(_require(cfg, "num_hidden_layers", source)),
        vocab_size=int(_require(cfg, "vocab_size", source)),
        d_conv=int(cfg.get("conv_kernel", 4)),
        expand=int(cfg.get("expand", 2)),
        conv_bias=bool(cfg.get("use_conv_bias", True)),
        bias=bool(cfg.get("use_bias", False)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        # transformers checkpoints store the embedding at its final (already padded) size.
        pad_vocab_size_multiple=int(cfg.get("pad_vocab_size_multiple", 1) or 1),
    )
    if model_type in ("mamba", "falcon_mamba"):
        rank = cfg.get("time_step_rank", "auto")
        eps = None
        if model_type == "falcon_mamba":
            eps = _float(cfg.get("mixer_rms_eps", 1e-6), "mixer_rms_eps", source)
        return MambaConfig(
            **common,
            d_state=int(cfg.get("state_size", 16)),
            dt_rank=None if rank == "auto" else int(rank),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            mixer_rms_eps=eps,
        )
    out = Mamba2Config(
        **common,
        d_state=int(cfg.get("state_size", 128)),
        headdim=int(cfg.get("head_dim", 64)),
        ngroups=int(cfg.get("n_groups", 8)),
        chunk_size=int(cfg.get("chunk_size", 256)),
        dt_limit=_limit(cfg.get("time_step_limit", (0.0, _INF)), "time_step_limit", source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    heads = cfg.get("num_heads")
    if heads is not None and int(heads) != out.nheads:
        raise ConfigError(
            f"{source}: num_heads={heads} but hidden_size·expand/head_dim = {out.nheads}"
        )
    return out


def from_dict(cfg: dict, source: str = "config.json") -> Config:
    """Any of the three schemas: ours (`arch` key), transformers (`model_type`), or mamba_ssm
    native (`d_model` + `n_layer`)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if "arch" in cfg:
        from longmamba_jax.hybrid.config import HYBRID_CONFIGS

        kinds = {"mamba1": MambaConfig, "mamba2": Mamba2Config, **HYBRID_CONFIGS}
        kind = kinds.get(cfg["arch"])
        if kind is None:
            raise ConfigError(f"{source}: arch={cfg['arch']!r} is not one of {sorted(kinds)}")
        fields = {f.name for f in dataclasses.fields(kind)}
        unknown = set(cfg) - fields - {"arch"}
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)} for {cfg['arch']}")
        try:
            return kind(**{k: (_limit(v, k, source) if k == "dt_limit" else v)
                           for k, v in cfg.items() if k != "arch"})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if "model_type" in cfg:
        return from_hf_config(cfg, source)
    if "d_model" in cfg and "n_layer" in cfg:
        return from_native_config(cfg, source)
    raise ConfigError(
        f"{source}: unknown config schema (no 'arch', no 'model_type', no 'd_model'/'n_layer')"
    )
