"""HF `config.json` (LlamaForCausalLM) <-> our ModelConfig, with clear errors for what we cannot represent."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.tokenizer.special_tokens import ENDOFTEXT, ENDOFTURN, PAD, SPECIAL_TOKEN_IDS

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)

EOD_ID = SPECIAL_TOKEN_IDS[ENDOFTEXT]
ENDOFTURN_ID = SPECIAL_TOKEN_IDS[ENDOFTURN]
PAD_ID = SPECIAL_TOKEN_IDS[PAD]


class UnsupportedModelError(ValueError):
    """The HF model uses a feature the HCX decoder (megatron GPTModel with our spec) does not have."""


def hf_config_from_model(m: ModelConfig, torch_dtype: str, has_hcx_tokenizer: bool = True) -> dict[str, Any]:
    """config.json for LlamaForCausalLM. HCX has no BOS token: documents are separated by <|endoftext|>, which
    therefore also serves as bos (the token every training document follows)."""
    special = {"bos_token_id": EOD_ID, "eos_token_id": EOD_ID, "pad_token_id": PAD_ID} if has_hcx_tokenizer \
        else {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),  # transformers 4.x name
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},  # transformers 5.x name
        "rope_scaling": None,
        "max_position_embeddings": m.max_position_embeddings,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        **special,
    }


def generation_config(has_hcx_tokenizer: bool = True) -> dict[str, Any]:
    """Stop at the end of a document or of an assistant turn (chat)."""
    if not has_hcx_tokenizer:
        return {"_from_model_config": False}
    return {"bos_token_id": EOD_ID, "eos_token_id": [EOD_ID, ENDOFTURN_ID], "pad_token_id": PAD_ID,
            "do_sample": False}


def _rope_theta(cfg: dict[str, Any], where: str) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind not in ("default", None):
            raise UnsupportedModelError(
                f"{where}: rope type {kind!r} (rope scaling) is not supported; only plain RoPE ('default') maps "
                "onto megatron's rotary embedding here")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig of an HF Llama-architecture config. Raises UnsupportedModelError naming the field."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedModelError(
            f"{where}: model_type={cfg.get('model_type')!r} architectures={archs}; supported: model_type 'llama' "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})")
    for field, bad in (("attention_bias", True), ("mlp_bias", True)):
        if cfg.get(field, False) == bad:
            raise UnsupportedModelError(f"{where}: {field}=true; HCX decoders have no linear biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={act!r}; only SwiGLU (silu) is supported")
    if cfg.get("pretraining_tp", 1) != 1:
        raise UnsupportedModelError(f"{where}: pretraining_tp={cfg['pretraining_tp']}; only 1 is supported")
    if cfg.get("sliding_window") is not None:
        raise UnsupportedModelError(f"{where}: sliding_window={cfg['sliding_window']!r}; sliding-window attention "
                                    "is not supported")
    theta = _rope_theta(cfg, where)
    if theta != int(theta):
        raise UnsupportedModelError(f"{where}: rope_theta={theta} is not an integer (ModelConfig.rotary_base is)")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise UnsupportedModelError(f"{where}: missing field(s) {missing}")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if heads % kv:
        raise UnsupportedModelError(f"{where}: num_attention_heads={heads} is not a multiple of "
                                    f"num_key_value_heads={kv}")
    return ModelConfig(
        name=str(cfg.get("_name_or_path") or "hf-import"),
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv,
        kv_channels=head_dim,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rotary_base=int(theta),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        note="imported from a Hugging Face Llama-architecture checkpoint",
    )


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_yaml_fields(m: ModelConfig) -> dict[str, Any]:
    """Fields for a --model-config YAML (everything that shapes the model; no 'preset')."""
    d = dataclasses.asdict(m)
    return {k: d[k] for k in (
        "name", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
        "norm_epsilon", "untie_embeddings_and_output_weights", "init_method_std", "note")}
