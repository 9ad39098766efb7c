"""Exact parameter counts per rank, the distributed optimizer's per-rank shard, and Megatron-FSDP's per-rank
buffers (megatron_fsdp_shards).

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


def _norm_shapes(cfg: ModelConfig, h: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("weight", (h,))]
    if cfg.normalization.lower() == "layernorm":
        out.append(("bias", (h,)))
    return out


def _norm_params(cfg: ModelConfig, h: int) -> list[tuple[str, int]]:
    return _numels(_norm_shapes(cfg, h))


def layer_param_shapes(cfg: ModelConfig, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, local shape) of one transformer layer's parameters on one TP rank, in registration order.
    Megatron-FSDP lays its buffers out by row size (shape[1:]), so the shapes, not only the counts, matter."""
    h, d, a, g, f = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    gate = 2 if cfg.activation.lower() in ("swiglu", "geglu", "reglu") else 1
    qkv_out = (a + 2 * g) * d // tp
    bias = cfg.add_bias_linear
    out: list[tuple[str, tuple[int, ...]]] = [(f"input_layernorm.{n}", k) for n, k in _norm_shapes(cfg, h)]
    out.append(("self_attention.linear_proj.weight", (h, a * d // tp)))
    if bias:
        out.append(("self_attention.linear_proj.bias", (h,)))
    out.append(("self_attention.linear_qkv.weight", (qkv_out, h)))
    if bias:
        out.append(("self_attention.linear_qkv.bias", (qkv_out,)))
    out += [(f"pre_mlp_layernorm.{n}", k) for n, k in _norm_shapes(cfg, h)]
    out.append(("mlp.linear_fc1.weight", (gate * f // tp, h)))
    if bias:
        out.append(("mlp.linear_fc1.bias", (gate * f // tp,)))
    out.append(("mlp.linear_fc2.weight", (h, f // tp)))
    if bias:
        out.append(("mlp.linear_fc2.bias", (h,)))
    return out


def _numels(shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, int]]:
    return [(n, math.prod(shape)) for n, shape in shapes]


def layer_params(cfg: ModelConfig, tp: int) -> list[tuple[str, int]]:
    """(name, numel) of one transformer layer's parameters on one TP rank, in registration order."""
    return _numels(layer_param_shapes(cfg, tp))


def chunk_param_shapes(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, vpp: int | None = None,
                       vpp_rank: int = 0, padded_vocab: int | None = None, *,
                       layers_in_chunk: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, local shape) of the model chunk (pp_rank, vpp_rank) on one TP rank, in registration order.
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
    out: list[tuple[str, tuple[int, ...]]] = []
    if first:
        out.append(("embedding.word_embeddings.weight", (vocab // tp, h)))
        if cfg.position_embedding_type == "learned_absolute":
            out.append(("embedding.position_embeddings.weight", (cfg.max_position_embeddings, h)))
    per_layer = layer_param_shapes(cfg, tp)
    for i in range(n_layers):
        # named_parameters() numbers a chunk's layers locally from 0 (the global number, used for
        # checkpoint keys, is c*(L/v) + r*(L/(p*v)) + i for chunk c of stage r)
        out += [(f"decoder.layers.{i}.{n}", k) for n, k in per_layer]
    if last:
        out += [(f"decoder.final_layernorm.{n}", k) for n, k in _norm_shapes(cfg, h)]
        if cfg.untie_embeddings_and_output_weights or pp > 1:
            out.append(("output_layer.weight", (vocab // tp, h)))
    return out


def chunk_params(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, vpp: int | None = None, vpp_rank: int = 0,
                 padded_vocab: int | None = None, *, layers_in_chunk: int | None = None) -> list[tuple[str, int]]:
    """(name, numel) of the model chunk (pp_rank, vpp_rank) on one TP rank, in registration order."""
    return _numels(chunk_param_shapes(cfg, tp, pp, pp_rank, vpp, vpp_rank, padded_vocab,
                                      layers_in_chunk=layers_in_chunk))


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


# Megatron-FSDP's --data-parallel-sharding-strategy values: what is sharded over the DP x CP group
FSDP_SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclass(frozen=True)
class FsdpBucket:
    """One of Megatron-FSDP's parameter groups: a contiguous (virtual) buffer, sharded in DP equal slices."""

    unit: int | None  # the FSDP unit (transformer layer, local index) it belongs to; None: outside any unit
    chunk_size_factor: int  # the alignment grid of its items (a multiple of their row sizes)
    numel: int  # elements, padded to DP x chunk_size_factor: what an all-gather materialises
    items: tuple[tuple[str, int, int], ...]  # (name, start, numel) in the group's order


@dataclass(frozen=True)
class MegatronFsdpShards:
    """What megatron-core 0.16.1's Megatron-FSDP allocates on each rank of a DP x CP group, in elements
    (one model chunk). Dtypes: model weights in the parameter dtype, main weights fp32, main grads fp32 under
    grad_reduce_in_fp32 (else the parameter dtype); the optimizer's Adam moments follow the main weights."""

    dp: int
    strategy: str
    buckets: tuple[FsdpBucket, ...]
    model_weight_elements: int  # per rank; no_shard: the module's own (unpadded) parameters
    main_weight_elements: int  # per rank (fp32 main weights, preserve_fp32_weights)
    main_grad_elements: int  # per rank
    optimizer_elements_per_dp_rank: tuple[int, ...]  # parameter elements whose main weight each rank optimizes


def _fsdp_pack(sizes: list[int], grid: int) -> tuple[list[int], int]:
    """Offsets of items (in the given order) in one Megatron-FSDP group, and the used length.

    Items of at least one grid cell go in order, each from the start of a cell; the unfilled end of an item's
    last cell is shared with the first later item whose own remainder fits there (that item's remainder sits at
    the cell's end, its whole cells follow), then with smaller-than-a-cell items, first come first placed,
    while they fit. Small items that found no gap go after everything, unaligned."""
    regular = [i for i, n in enumerate(sizes) if n >= grid]
    small = [i for i, n in enumerate(sizes) if n < grid]
    offset = [0] * len(sizes)
    end = 0
    while regular:
        i = regular.pop(0)
        offset[i] = end
        rem = sizes[i] % grid
        if rem == 0:
            end += sizes[i]
            continue
        gap = end + sizes[i]
        end += (sizes[i] // grid + 1) * grid
        free = grid - rem
        partner = next((j for j in regular if sizes[j] % grid and rem + sizes[j] % grid <= grid), None)
        if partner is not None:
            regular.remove(partner)
            offset[partner] = end - sizes[partner] % grid
            free -= sizes[partner] % grid
            end += sizes[partner] // grid * grid
        for j in list(small):
            if sizes[j] <= free:
                offset[j] = gap
                gap += sizes[j]
                free -= sizes[j]
                small.remove(j)
    for j in small:
        offset[j] = end
        end += sizes[j]
    return offset, end


def megatron_fsdp_shards(param_shapes: list[tuple[str, tuple[int, ...]]], dp: int,
                         strategy: str = "optim_grads_params", bucket_size: int | None = None,
                         shared_embedding_names: frozenset[str] = frozenset()) -> MegatronFsdpShards:
    """Predict megatron-core 0.16.1's Megatron-FSDP buffers (megatron_fsdp/param_and_grad_buffer.py) for one
    model chunk whose parameters are `param_shapes` (registration order, local shapes), over a DP x CP group
    of `dp` ranks. Rules, as that code applies them to one dtype of trainable dense parameters:

    1. groups: under optim_grads_params each transformer layer is an FSDP unit with its own group; every
       other parameter (embeddings, final norm, output layer) shares one group (all of them, under the other
       strategies). Groups come in order of their first parameter.
    2. a shared (tied, PP > 1) embedding gets a group of its own; outside units a group closes once it holds
       >= bucket_size elements (--ddp-bucket-size; None: never, as megatron-fsdp passes the DDP config's).
    3. in each group parameters are stably sorted by row size (numel of shape[1:]) descending; the grid
       starts at the first row size and becomes lcm(grid, row) for each later parameter whose row neither
       divides the grid with a numel that is a whole number of grid cells, nor is smaller than one cell.
    4. items are packed on that grid (_fsdp_pack) and the group padded to a multiple of dp x grid (not
       padded under no_shard); DP rank r owns elements [r, r + 1) x numel / dp of every group.
    Per rank the model-weight buffer holds a shard under optim_grads_params (the whole padded group under
    optim / optim_grads; the module's own weights under no_shard), the main-weight buffer a shard unless
    no_shard, the gradient buffer a shard under optim_grads / optim_grads_params; the optimizer works on the
    real parameter elements inside this rank's main-weight shard.
    """
    if strategy not in FSDP_SHARDING_STRATEGIES:
        raise ValueError(f"data_parallel_sharding_strategy must be one of {FSDP_SHARDING_STRATEGIES}, "
                         f"got {strategy!r}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")

    def unit_of(name: str) -> int | None:
        if strategy != "optim_grads_params" or not name.startswith("decoder.layers."):
            return None
        return int(name.split(".")[2])

    groups: dict[int | None, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in param_shapes:
        groups.setdefault(unit_of(name), []).append((name, tuple(shape)))
    split: list[tuple[int | None, list[tuple[str, tuple[int, ...]]]]] = []
    for unit, members in groups.items():
        current: list[tuple[str, tuple[int, ...]]] = []
        for name, shape in members:
            if name in shared_embedding_names and strategy != "no_shard":
                if current:
                    split.append((unit, current))
                split.append((unit, [(name, shape)]))
                current = []
                continue
            current.append((name, shape))
            if unit is None and bucket_size and sum(math.prod(s) for _, s in current) >= bucket_size:
                split.append((unit, current))
                current = []
        if current:
            split.append((unit, current))

    buckets = []
    for unit, members in split:
        def row(shape: tuple[int, ...]) -> int:
            return math.prod(shape[1:])

        members = sorted(members, key=lambda m: row(m[1]), reverse=True)
        grid = row(members[0][1])
        for _, shape in members:
            r, n = row(shape), math.prod(shape)
            if not (r == grid or (grid % r == 0 and n % grid == 0) or n < grid):
                grid = math.lcm(grid, r)
        sizes = [math.prod(s) for _, s in members]
        offsets, used = _fsdp_pack(sizes, grid)
        numel = used if strategy == "no_shard" else int(math.ceil(used / (dp * grid)) * dp * grid)
        buckets.append(FsdpBucket(unit=unit, chunk_size_factor=grid, numel=numel,
                                  items=tuple((n, o, k) for (n, _), o, k in zip(members, offsets, sizes))))

    def per_rank(distributed: bool) -> int:
        return sum(b.numel // dp if distributed and dp > 1 else b.numel for b in buckets)

    if strategy == "no_shard":
        weights = sum(k for b in buckets for _, _, k in b.items)
        owned = tuple([weights] * dp)
    else:
        weights = per_rank(strategy == "optim_grads_params")
        owned_list = [0] * dp
        for b in buckets:
            shard = b.numel // dp
            for r in range(dp):
                s0, s1 = r * shard, (r + 1) * shard
                owned_list[r] += sum(max(0, min(o + k, s1) - max(o, s0)) for _, o, k in b.items)
        owned = tuple(owned_list)
    return MegatronFsdpShards(dp=dp, strategy=strategy, buckets=tuple(buckets), model_weight_elements=weights,
                              main_weight_elements=per_rank(strategy != "no_shard"),
                              main_grad_elements=per_rank(strategy in ("optim_grads", "optim_grads_params")),
                              optimizer_elements_per_dp_rank=owned)


__all__ = [
    "layer_params",
    "chunk_params",
    "params_per_rank",
    "max_params_per_rank",
    "total_unique_params",
    "shared_embedding_names",
    "ShardLayout",
    "distributed_optimizer_shards",
    "layer_param_shapes",
    "chunk_param_shapes",
    "FSDP_SHARDING_STRATEGIES",
    "FsdpBucket",
    "MegatronFsdpShards",
    "megatron_fsdp_shards",
]
