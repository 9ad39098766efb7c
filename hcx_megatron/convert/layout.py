"""Tensor layouts: megatron-core GPTModel (global, as stored in a torch_dist checkpoint) <-> HF Llama.

Pure functions on full (global) tensors; no processes, no files. Why "global" is enough: megatron-core's
`sharded_state_dict` stores every parameter in a layout-independent global form, so the TP/PP/VPP a run used
never shows up in the stored tensors:

  * decoder layers are stacked along a leading layer axis numbered GLOBALLY (pipeline/virtual stages contribute
    their slices of that axis), so "renumbering pipeline layers" is reading index l of that axis;
  * `linear_qkv.weight` [ng * (np/ng + 2) * d, h]: TP ranks hold consecutive query groups, each group laid out as
    its np/ng query heads, then its key head, then its value head; concatenating the TP shards along dim 0 (what
    the checkpoint holds) is therefore the same per-group layout for any TP;
  * `linear_fc1.weight` [2f, h]: each TP rank holds [gate_r; up_r], but megatron's SwiGLU sharded factory stores
    gate_r at fragment r and up_r at fragment tp + r of 2*tp, so the stored tensor is [gate (all f); up (all f)];
  * vocabulary tensors have Megatron's padded size (a multiple of make_vocab_size_divisible_by x TP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Megatron sharded-state-dict keys. Checkpoints hold the bare GPTModel's keys ("embedding.word_embeddings.weight");
# checkpoints written by earlier versions of hcx_megatron's save_checkpoint took them from the DDP wrapper, which
# prefixes "module.". Both are read: see detect_prefix.
MCORE_PREFIX = ""
KNOWN_PREFIXES = ("", "module.")
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."
QKV = "self_attention.linear_qkv.weight"
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
PROJ = "self_attention.linear_proj.weight"
FC1 = "mlp.linear_fc1.weight"
PRE_MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC2 = "mlp.linear_fc2.weight"
LAYER_KEYS = (INPUT_NORM, QKV, PROJ, PRE_MLP_NORM, FC1, FC2)


def mcore_key(name: str, layer: bool = False, prefix: str = MCORE_PREFIX) -> str:
    return prefix + (LAYER_PREFIX if layer else "") + name


def detect_prefix(keys) -> str:
    """The key prefix of a checkpoint's model tensors ("" or "module.")."""
    keys = set(keys)
    for prefix in KNOWN_PREFIXES:
        if prefix + EMBEDDING in keys:
            return prefix
    raise ValueError("no embedding.word_embeddings.weight tensor (with any known prefix "
                     f"{list(KNOWN_PREFIXES)}): not a GPT checkpoint of hcx_megatron")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int  # np: query heads
    num_groups: int  # ng: key/value heads (GQA query groups)
    head_dim: int  # d
    hidden_size: int  # h

    def __post_init__(self):
        if self.num_heads % self.num_groups:
            raise ValueError(f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                             f"({self.num_groups})")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def qkv_rows(self) -> int:
        return self.num_groups * (self.heads_per_group + 2) * self.head_dim


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV [ng*(np/ng+2)*d, h] -> HF (q [np*d, h], k [ng*d, h], v [ng*d, h]).

    Per query group the fused rows are: the group's np/ng query heads, then its key head, then its value head."""
    if tuple(qkv.shape) != (shape.qkv_rows, shape.hidden_size):
        raise ValueError(f"linear_qkv.weight has shape {tuple(qkv.shape)}, expected "
                         f"({shape.qkv_rows}, {shape.hidden_size}) for {shape}")
    g, r, d, h = shape.num_groups, shape.heads_per_group, shape.head_dim, shape.hidden_size
    grouped = qkv.reshape(g, r + 2, d, h)
    q = grouped[:, :r].reshape(g * r * d, h)
    k = grouped[:, r].reshape(g * d, h)
    v = grouped[:, r + 1].reshape(g * d, h)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """Inverse of split_qkv (HF q/k/v projections -> Megatron's per-group fused layout)."""
    g, r, d, h = shape.num_groups, shape.heads_per_group, shape.head_dim, shape.hidden_size
    for name, t, rows in (("q_proj", q, g * r * d), ("k_proj", k, g * d), ("v_proj", v, g * d)):
        if tuple(t.shape) != (rows, h):
            raise ValueError(f"{name}.weight has shape {tuple(t.shape)}, expected ({rows}, {h}) for {shape}")
    fused = torch.cat([q.reshape(g, r, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)], dim=1)
    return fused.reshape(shape.qkv_rows, h).contiguous()


def split_fc1(fc1: torch.Tensor, ffn_hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron SwiGLU linear_fc1 [2f, h] (global: [gate; up]) -> (gate_proj, up_proj)."""
    if fc1.shape[0] != 2 * ffn_hidden_size:
        raise ValueError(f"linear_fc1.weight has {fc1.shape[0]} rows, expected 2 x ffn_hidden_size = "
                         f"{2 * ffn_hidden_size}")
    return fc1[:ffn_hidden_size].contiguous(), fc1[ffn_hidden_size:].contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0).contiguous()


def cut_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop Megatron's vocabulary padding rows."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"vocabulary tensor has {weight.shape[0]} rows, fewer than the model's vocab_size "
                         f"{vocab_size}")
    return weight[:vocab_size].contiguous()


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows up to Megatron's padded vocabulary (hcx init also keeps padding rows at zero)."""
    if weight.shape[0] > padded_size:
        raise ValueError(f"vocabulary tensor has {weight.shape[0]} rows, more than the padded size {padded_size}")
    if weight.shape[0] == padded_size:
        return weight.contiguous()
    pad = torch.zeros(padded_size - weight.shape[0], *weight.shape[1:], dtype=weight.dtype)
    return torch.cat([weight, pad], dim=0)


def hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"


def mcore_layer_to_hf(layer: dict[str, torch.Tensor], i: int, shape: AttentionShape,
                      ffn_hidden_size: int) -> dict[str, torch.Tensor]:
    """One decoder layer: {megatron layer key: tensor} -> {HF name: tensor}."""
    n = hf_layer_names(i)
    q, k, v = split_qkv(layer[QKV], shape)
    gate, up = split_fc1(layer[FC1], ffn_hidden_size)
    return {n["input_norm"]: layer[INPUT_NORM], n["q"]: q, n["k"]: k, n["v"]: v, n["o"]: layer[PROJ],
            n["post_norm"]: layer[PRE_MLP_NORM], n["gate"]: gate, n["up"]: up, n["down"]: layer[FC2]}


def hf_layer_to_mcore(get, i: int, shape: AttentionShape) -> dict[str, torch.Tensor]:
    """One decoder layer: `get(hf_name) -> tensor` -> {megatron layer key: tensor}."""
    n = hf_layer_names(i)
    return {
        INPUT_NORM: get(n["input_norm"]),
        QKV: merge_qkv(get(n["q"]), get(n["k"]), get(n["v"]), shape),
        PROJ: get(n["o"]),
        PRE_MLP_NORM: get(n["post_norm"]),
        FC1: merge_fc1(get(n["gate"]), get(n["up"])),
        FC2: get(n["down"]),
    }
