"""Target model configuration and its parsing from Hugging Face `config.json` files.

Two config conventions exist on disk and both are read: transformers 4.x writes top-level
`rope_theta`, `rope_scaling` (`type` or `rope_type`) and `torch_dtype`; transformers 5.x writes
`rope_parameters: {rope_theta, rope_type, ...}` and `dtype`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from aurora_jax.errors import CheckpointError
from pallas_kernels.dispatch import check_impl

# Hugging Face architecture name -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


DtypeName = Literal["float32", "bfloat16", "float16", "auto"]
"""Parameter dtypes a model loads in ("auto": the device's, see `device_dtype`)."""
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""Weight dtype names (all of DtypeName but "auto") -> dtype."""


def device_dtype(name: str, checkpoint_dtype: str | None = None,
                 backend: str | None = None) -> str:
    """A DtypeName made concrete. "auto" is float32 on CPU, where bfloat16 matmuls run
    several times slower than float32 ones, and bfloat16 on GPU and TPU (float16 where the
    checkpoint is float16), with float32 accumulation (matmul_f32 for logits, float32
    softmax and RMSNorm)."""
    if name != "auto":
        return name
    if (backend or jax.default_backend()) == "cpu":
        return "float32"
    return "float16" if checkpoint_dtype == "float16" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Llama-3.1 style `llama3`, or `linear`)."""

    kind: str
    """"llama3" or "linear"."""
    factor: float
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained with."""

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r} (llama3, linear)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Shape and numerics of a Llama-3 / Qwen3 style decoder."""

    vocab_size: int
    """V: rows of the token embedding and columns of the lm_head."""
    hidden_size: int
    """H: width of the residual stream."""
    intermediate_size: int
    """F: width of the SwiGLU MLP."""
    num_layers: int
    """L: decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """K: key/value heads (grouped-query attention when < num_heads)."""
    head_dim: int
    """D: width of one attention head."""
    family: str = "llama"
    """"llama" or "qwen3" (Qwen3 adds a per-head RMSNorm on queries and keys)."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Optional RoPE frequency scaling."""
    max_position_embeddings: int = 2048
    """Longest sequence (prompt plus generation) the model accepts."""
    tie_word_embeddings: bool = False
    """The lm_head reuses the token embedding."""
    aux_layers: tuple[int, ...] | None = None
    """Decoder layers whose outputs are returned as aux hidden states (EAGLE-3 features);
    None means the EAGLE-3 default (1, L//2-1, L-4)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if the model has one."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a generation."""
    pad_token_id: int | None = None
    """Padding token, if the model has one."""
    attention: str = "auto"
    """Attention implementation (not a checkpoint property): "auto" (the Pallas kernel on
    GPU, the jnp reference elsewhere), "reference", "pallas" or "interpret" (the kernel in
    Pallas interpret mode, for tests on CPU). See pallas_kernels/dispatch.py."""

    def __post_init__(self):
        check_impl(self.attention)
        if self.family not in ("llama", "qwen3"):
            raise ValueError(f"unknown model family {self.family!r} (llama, qwen3)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")
        for i in self.resolved_aux_layers:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"aux layer {i} outside 0..{self.num_layers - 1}")

    @property
    def resolved_aux_layers(self) -> tuple[int, ...]:
        """The aux layer indices, with the EAGLE-3 default filled in."""
        if self.aux_layers is not None:
            return tuple(self.aux_layers)
        n = self.num_layers
        if n < 8:  # the EAGLE-3 formula repeats layers in shallow models; spread them instead
            return (0, n // 2, n - 1)
        return (1, n // 2 - 1, n - 4)

    @property
    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * f + 2 * h + (2 * d if self.family == "qwen3" else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    # ---------------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> TargetConfig:
        """Parses a Hugging Face `config.json` dictionary; errors name the offending field."""
        archs = raw.get("architectures") or []
        family = None
        for a in archs:
            family = SUPPORTED_ARCHITECTURES.get(a)
            if family:
                break
        if family is None:
            family = {"llama": "llama", "qwen3": "qwen3"}.get(raw.get("model_type", ""))
        if family is None:
            raise CheckpointError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if raw.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported")

        def need(key):
            if key not in raw:
                raise CheckpointError(f"{source}: missing required field {key!r}")
            return raw[key]

        rope = dict(raw.get("rope_parameters") or {})
        legacy = raw.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling_src = legacy or rope
        kind = scaling_src.get("rope_type", scaling_src.get("type", "default"))
        scaling = None
        if kind not in ("default", None):
            try:
                scaling = RopeScaling(
                    kind=kind, factor=float(scaling_src["factor"]),
                    low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(scaling_src.get(
                        "original_max_position_embeddings", 8192)))
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{source}: bad rope scaling {scaling_src}: {e}") from e
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                family=family,
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_layers=int(need("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=raw.get("pad_token_id"),
            )
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The transformers 5.x style `config.json` for this model (also read by 4.x)."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope.update(rope_type=s.kind, factor=s.factor)
            if s.kind == "llama3":
                rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                            original_max_position_embeddings=s.original_max_position_embeddings)
        eos = list(self.eos_token_ids)
        return {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "torch_dtype": dtype,
        }


def read_hf_config(path: str | Path) -> TargetConfig:
    """Reads `config.json` from a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path is neither a directory nor a .gguf file: {path}")
    cfg_file = path / "config.json"
    return TargetConfig.from_hf_dict(read_config_json(path, "a Hugging Face checkpoint"),
                                     source=str(cfg_file))


def read_config_json(path: str | Path, kind: str) -> dict:
    """The parsed config.json of a checkpoint directory of the given kind (for messages)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {path} (not {kind})")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
