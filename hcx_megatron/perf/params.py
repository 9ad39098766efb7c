"""Exact parameter counts per rank, and the distributed optimizer's per-rank shard.

Mirrors how megatron-core's GPTModel places weights (local layer spec):
- first pipeline stage, first virtual chunk: word embeddings [V_pad/TP, h] (+ learned positions);
- every chunk: its layers; per layer input_layernorm [h], linear_proj [h, a·d/TP],
  linear_qkv [(a+2g)·d/TP, h], pre_mlp_layernorm [h], linear_fc1 [G·f/TP, h], linear_fc2 [h, f/TP]
  (biases when add_bias_linear; RowParallel biases and norms are replicated across TP);
- last stage, last chunk: final_layernorm [h] and output_layer [V_pad/TP, h] (untied; with tied
  embeddings the last stage still holds a copy when PP > 1).
The order is megatron-core's registration order (linear_proj is created before linear_qkv),
which the distributed optimizer's buffer layout depends on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hcx_megatron.config.model import ModelConfig


def _norm_params(cfg: ModelConfig, h: int) -> list[tuple[str, int]]:
    out = [("weight", h)]
    if cfg.normalization.lower() == "layernorm":
        out.append(("bias", h))
    return out


def layer_params(cfg: ModelConfig, tp: int) -> list[tuple[str, int]]:
    """(name, numel) of one transformer layer's parameters on one TP rank, in registration order."""
    h, d, a, g, f = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    gate = 2 if cfg.activation.lower() in ("swiglu", "geglu", "reglu") else 1
    qkv_out = (a + 2 * g) * d // tp
    bias = cfg.add_bias_linear
    out: list[tuple[str, int]] = [(f"input_layernorm.{n}", k) for n, k in _norm_params(cfg, h)]
    out.append(("self_attention.linear_proj.weight", h * (a * d // tp)))
    if bias:
        out.append(("self_attention.linear_proj.bias", h))
    out.append(("self_attention.linear_qkv.weight", qkv_out * h))
    if bias:
        out.append(("self_attention.linear_qkv.bias", qkv_out))
    out += [(f"pre_mlp_layernorm.{n}", k) for n, k in _norm_params(cfg, h)]
    out.append(("mlp.linear_fc1.weight", gate * f // tp * h))
    if bias:
        out.append(("mlp.linear_fc1.bias", gate * f // tp))
    out.append(("mlp.linear_fc2.weight", h * (f // tp)))
    if bias:
        out.append(("mlp.linear_fc2.bias", h))
    return out


def chunk_params(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, vpp: int | None = None, vpp_rank: int = 0,
                 padded_vocab: int | None = None, *, layers_in_chunk: int | None = None) -> list[tuple[str, int]]:
    """(name, numel) of the model chunk (pp_rank, vpp_rank) on one TP rank, in registration order.
    `layers_in_chunk` overrides num_layers / (PP x VPP) for uneven stages (Layout.stage_layers gives it)."""
    v = vpp or 1
    if not (0 <= pp_rank < pp and 0 <= vpp_rank < v):
        raise ValueError(f"pp_rank {pp_rank} / vpp_rank {vpp_rank} outside PP {pp} x VPP {v}")
    if layers_in_chunk is None and cfg.num_layers % (pp * v):
        raise ValueError(f"num_layers {cfg.num_layers} not divisible by PP x VPP = {pp * v}")
    vocab = padded_vocab if padded_vocab is not None else cfg.padded_vocab_size(tp)
    h = cfg.hidden_size
    first = pp_rank == 0 and vpp_rank == 0
    last = pp_rank == pp - 1 and vpp_rank == v - 1
    n_layers = cfg.num_layers // (pp * v) if layers_in_chunk is None else layers_in_chunk
    out: list[tuple[str, int]] = []
    if first:
        out.append(("embedding.word_embeddings.weight", vocab // tp * h))
        if cfg.position_embedding_type == "learned_absolute":
            out.append(("embedding.position_embeddings.weight", cfg.max_position_embeddings * h))
    per_layer = layer_params(cfg, tp)
    for i in range(n_layers):
        # named_parameters() numbers a chunk's layers locally from 0 (the global number, used for
        # checkpoint keys, is c*(L/v) + r*(L/(p*v)) + i for chunk c of stage r)
        out += [(f"decoder.layers.{i}.{n}", k) for n, k in per_layer]
    if last:
        out += [(f"decoder.final_layernorm.{n}", k) for n, k in _norm_params(cfg, h)]
        if cfg.untie_embeddings_and_output_weights or pp > 1:
            out.append(("output_layer.weight", vocab // tp * h))
    return out


def params_per_rank(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, vpp: int | None = None,
                    padded_vocab: int | None = None, *, layers_on_rank: int | None = None) -> int:
    """Parameters held by one GPU (all its virtual chunks) at pipeline rank pp_rank.

    Same rules as chunk_params, summed arithmetically (the planner calls this a lot).
    `layers_on_rank` overrides num_layers / PP for uneven stages (Layout.stage_layers gives it).
    """
    v = vpp or 1
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} outside PP {pp}")
    if layers_on_rank is None and cfg.num_layers % (pp * v):
        raise ValueError(f"num_layers {cfg.num_layers} not divisible by PP x VPP = {pp * v}")
    vocab = padded_vocab if padded_vocab is not None else cfg.padded_vocab_size(tp)
    h = cfg.hidden_size
    n_layers = cfg.num_layers // pp if layers_on_rank is None else layers_on_rank
    n = n_layers * sum(k for _, k in layer_params(cfg, tp))
    if pp_rank == 0:
        n += vocab // tp * h
        if cfg.position_embedding_type == "learned_absolute":
            n += cfg.max_position_embeddings * h
    if pp_rank == pp - 1:
        n += sum(k for _, k in _norm_params(cfg, h))
        if cfg.untie_embeddings_and_output_weights or pp > 1:
            n += vocab // tp * h
    return n


def max_params_per_rank(cfg: ModelConfig, tp: int, pp: int, vpp: int | None = None,
                        padded_vocab: int | None = None) -> int:
    return max(params_per_rank(cfg, tp, pp, r, vpp, padded_vocab) for r in range(pp))


def total_unique_params(cfg: ModelConfig, tp: int = 1, padded_vocab: int | None = None) -> int:
    """Whole-model parameters (each TP shard counted once, tied copies once)."""
    return params_per_rank(cfg, 1, 1, 0, None, padded_vocab or cfg.padded_vocab_size(tp))


def shared_embedding_names(cfg: ModelConfig, pp: int) -> frozenset[str]:
    """Parameters megatron marks `shared_embedding` (tied embeddings split over first/last stage)."""
    if cfg.untie_embeddings_and_output_weights or pp == 1:
        return frozenset()
    return frozenset({"embedding.word_embeddings.weight", "output_layer.weight"})


@dataclass(frozen=True)
class ShardLayout:
    """How the distributed optimizer splits one rank's grad buffer over its DP group."""

    buffer_numel: int  # padded buffer elements (params + alignment padding)
    shard_numel: int  # buffer_numel / dp: each DP rank's slice
    param_elements_per_dp_rank: tuple[int, ...]  # real (non-padding) elements each DP rank owns


def distributed_optimizer_shards(param_numels: list[tuple[str, int]], dp: int, bucket_size: int | None = None,
                                 shared_embedding_names: frozenset[str] = frozenset()) -> ShardLayout:
    """Predict megatron-core's _ParamAndGradBuffer layout under use_distributed_optimizer.

    Rules (megatron-core 0.16 param_and_grad_buffer.py): params are laid out in REVERSE
    registration order; each param starts at a multiple of 64 elements; a bucket closes once it
    holds >= bucket_size elements (or at a shared embedding) and its end is padded to a multiple
    of lcm(dp, 128); each bucket is split in dp equal shards and DP rank r owns shard r of
    every bucket. The optimizer keeps state only for the real parameter elements of its shards.
    """
    def pad(x: int, m: int) -> int:
        return int(math.ceil(x / m) * m)

    div = math.lcm(dp, 128)
    buckets: list[tuple[int, int]] = []
    ranges: list[tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0
    for name, numel in reversed(param_numels):
        start = pad(start, 64)
        shared = name in shared_embedding_names
        if shared and in_bucket:
            end_b = pad(start, div)
            buckets.append((bucket_start, end_b))
            start = bucket_start = end_b
            in_bucket = 0
        end = start + numel
        ranges.append((start, end))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or shared:
            end_b = pad(end, div)
            buckets.append((bucket_start, end_b))
            start = bucket_start = end_b
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, pad(end, div)))
    total = buckets[-1][1] if buckets else 0
    owned = [0] * dp
    for b0, b1 in buckets:
        shard = (b1 - b0) // dp
        for r in range(dp):
            s0, s1 = b0 + r * shard, b0 + (r + 1) * shard
            owned[r] += sum(max(0, min(e, s1) - max(s, s0)) for s, e in ranges)
    return ShardLayout(buffer_numel=total, shard_numel=total // dp, param_elements_per_dp_rank=tuple(owned))


__all__ = [
    "layer_params",
    "chunk_params",
    "params_per_rank",
    "max_params_per_rank",
    "total_unique_params",
    "shared_embedding_names",
    "ShardLayout",
    "distributed_optimizer_shards",
]
