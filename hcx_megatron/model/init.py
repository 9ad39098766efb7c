"""Layout-independent weight initialisation.

Goal: the same `--seed` gives the same model in every (TP, PP, VPP, DP) layout, so a team can change its
layout mid-project and compare runs. megatron-core's own initialisation draws from per-rank RNG streams, so the
values depend on the layout. Here every parameter is instead a slice of a *virtual full tensor* defined by a
counter-based generator:

  - the generator is numpy's Philox, keyed by (seed, global parameter name), where the name uses the GLOBAL
    layer number (`decoder.layers.17.mlp.linear_fc2.weight`), not the chunk-local one;
  - the virtual tensor is laid out with its tensor-parallel partition dimension first, and element i of that
    layout is the i-th draw. A rank owning rows [a, b) of it advances the counter straight to a*row_len
    (Philox is counter-based, so skipping ahead is O(1)) and draws only its own rows;
  - draws are uniforms mapped through the normal inverse CDF, so one draw = one value (no rejection loops that
    would break the counter arithmetic).

Consequences: identical weights in every layout, and no rank ever materialises a full tensor. Special cases:
SwiGLU `linear_fc1` is [gate; up] in the virtual tensor but each TP rank holds [gate_r; up_r]; vocabulary rows
past the tokenizer size (Megatron padding, which varies with TP) are zero.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import torch

_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"hcx-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def normal_rows(seed: int, name: str, row_start: int, row_stop: int, row_len: int, std: float) -> np.ndarray:
    """Rows [row_start, row_stop) of the virtual N(0, std^2) tensor `name` with rows of `row_len` values."""
    bitgen = np.random.Philox(key=_key(seed, name))
    first = row_start * row_len
    bitgen.advance(first // 4)  # Philox4x64 advance() skips 4 draws per step
    gen = np.random.Generator(bitgen)
    if first % 4:
        gen.random(first % 4)
    u = gen.random((row_stop - row_start) * row_len)
    u = np.clip(u, 1e-12, 1 - 1e-12)
    z = torch.special.ndtri(torch.from_numpy(u)).numpy()
    return (z * std).reshape(row_stop - row_start, row_len)


def global_param_name(local_name: str, layer_offsets: dict[int, int]) -> str:
    """Map a chunk-local parameter name to its global one (decoder layer index -> global layer index)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    prefix, idx, rest = m.groups()
    return f"{prefix}{layer_offsets[int(idx)]}{rest}"


def _fill_partitioned(param: torch.Tensor, seed: int, name: str, std: float, tp_rank: int, tp_size: int,
                      gated: bool, valid_rows: int | None) -> None:
    dim = getattr(param, "partition_dim", 0) if getattr(param, "tensor_model_parallel", False) else 0
    sharded = getattr(param, "tensor_model_parallel", False)
    local = param.data.transpose(0, dim) if param.dim() > 1 else param.data
    rows_local = local.shape[0]
    row_len = local[0].numel() if local.dim() > 1 else 1
    if not sharded:
        tp_rank, tp_size = 0, 1
    if gated:
        # Virtual tensor is [gate (ffn rows); up (ffn rows)]; this rank holds its slice of each half.
        half = rows_local // 2
        ffn = half * tp_size
        gate = normal_rows(seed, name, tp_rank * half, (tp_rank + 1) * half, row_len, std)
        up = normal_rows(seed, name, ffn + tp_rank * half, ffn + (tp_rank + 1) * half, row_len, std)
        values = np.concatenate([gate, up], axis=0)
    else:
        start = tp_rank * rows_local
        stop = start + rows_local
        values = np.zeros((rows_local, row_len))
        live_stop = stop if valid_rows is None else min(stop, valid_rows)
        if live_stop > start:
            values[: live_stop - start] = normal_rows(seed, name, start, live_stop, row_len, std)
    tensor = torch.from_numpy(values).reshape(local.shape).to(dtype=local.dtype)
    local.copy_(tensor.to(local.device))


@torch.no_grad()
def initialize_model_chunk(chunk: torch.nn.Module, seed: int, init_std: float, num_layers: int, vocab_size: int,
                           tp_rank: int, tp_size: int, gated_mlp: bool = True) -> list[str]:
    """Initialise every parameter of one (unwrapped) GPTModel chunk. Returns the global names it set."""
    layer_offsets = {}
    decoder = getattr(chunk, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_offsets[i] = layer.layer_number - 1  # megatron layer_number is global and 1-based
    scaled_std = init_std / math.sqrt(2.0 * num_layers)  # Megatron's scaled init for output projections
    names = []
    for local_name, param in chunk.named_parameters():
        name = global_param_name(local_name, layer_offsets)
        names.append(name)
        if name.endswith("output_layer.weight") and getattr(chunk, "share_embeddings_and_output_weights", False):
            name = "embedding.word_embeddings.weight"  # tied: the last stage's copy equals the embedding
        if "layernorm" in name or name.endswith("norm.weight") or "layer_norm_weight" in name:
            param.fill_(1.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        std = scaled_std if (name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight")) else init_std
        is_vocab = "word_embeddings" in name or name.endswith("output_layer.weight")
        _fill_partitioned(
            param, seed, name, std, tp_rank, tp_size,
            gated=gated_mlp and name.endswith("linear_fc1.weight"),
            valid_rows=vocab_size if is_vocab else None,
        )
    return names
