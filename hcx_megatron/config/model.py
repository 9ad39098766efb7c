"""Model shape presets for HCX-style decoders.

The HyperCLOVA X technical report (arXiv 2404.01954) describes the architecture (decoder-only,
RoPE, pre-normalization, grouped-query attention, 100k byte-level BPE vocabulary) but does NOT
publish layer counts or widths. The `hcx-s` and `hcx-l` shapes below are therefore ASSUMPTIONS:
plausible 8B-class and 70B-class GQA decoders, chosen so that the parallel layouts we ship for
8xH100 nodes divide them. `hcx-tiny` is ours, for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from hcx_megatron.config.frozen import Freezable


@dataclass
class ModelConfig(Freezable):
    """Shape of an HCX decoder. Every field maps onto megatron-core's TransformerConfig/GPTModel."""

    name: str = "custom"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = None  # head dim; None means hidden_size // num_attention_heads
    vocab_size: int = 100_000  # tokenizer vocabulary before Megatron padding
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rotary_base: int = 500_000
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    # Fixed for the HCX family; kept as fields so that imported HF models can state them.
    normalization: str = "RMSNorm"
    activation: str = "swiglu"
    add_bias_linear: bool = False
    position_embedding_type: str = "rope"
    assumed_shape: bool = False  # True where the shape is our guess, not a published number
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tensor_model_parallel_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron-LM's rule: pad up to a multiple of divisible_by * TP so each TP shard is even."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: the CI tests and the CPU demo. Its vocabulary is replaced by the
    # tokenizer's size when a tokenizer is given; 8192 is for --mock-data.
    "hcx-tiny": ModelConfig(
        name="hcx-tiny",
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=8192,
        max_position_embeddings=1024,
        rotary_base=10_000,
        note="test/demo model, not an HCX size",
    ),
    # ASSUMED shape (not published): an 8B-class GQA decoder (Llama-3-8B-like widths).
    "hcx-s": ModelConfig(
        name="hcx-s",
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=100_000,
        max_position_embeddings=32_768,
        rotary_base=500_000,
        assumed_shape=True,
        note="ASSUMED shape: HCX report does not publish sizes; 8B-class GQA decoder",
    ),
    # ASSUMED shape (not published): a 70B-class GQA decoder.
    "hcx-l": ModelConfig(
        name="hcx-l",
        num_layers=80,
        hidden_size=8192,
        ffn_hidden_size=28672,
        num_attention_heads=64,
        num_query_groups=8,
        vocab_size=100_000,
        max_position_embeddings=32_768,
        rotary_base=500_000,
        assumed_shape=True,
        note="ASSUMED shape: HCX report does not publish sizes; 70B-class GQA decoder",
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"--model-preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def load_model_yaml(path: str, base: ModelConfig | None = None) -> ModelConfig:
    """Read a YAML mapping of ModelConfig fields, optionally with `preset:` naming the base."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of model fields, got {type(data).__name__}")
    data = dict(data)
    preset = data.pop("preset", None)
    cfg = get_preset(preset) if preset else (base or ModelConfig())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **data)


def count_parameters(cfg: ModelConfig, padded_vocab: int | None = None) -> int:
    """Total parameters of the full (unsharded) model, biases-free SwiGLU GQA decoder."""
    v = padded_vocab if padded_vocab is not None else cfg.padded_vocab_size(1)
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q = cfg.num_attention_heads * d
    kv = 2 * cfg.num_query_groups * d
    per_layer = h * (q + kv) + q * h + h * 2 * f + f * h + 2 * h  # qkv, proj, fc1 (gate+up), fc2, 2 norms
    emb = v * h * (2 if cfg.untie_embeddings_and_output_weights else 1)
    return cfg.num_layers * per_layer + emb + h  # + final norm


__all__ = [
    "ModelConfig",
    "PRESETS",
    "get_preset",
    "load_model_yaml",
    "pad_vocab_size",
    "count_parameters",
]
