"""Memory per GPU: weights, gradients, optimizer state, activations (Korthikanti et al. 2022).

Activations of one transformer layer for one micro-batch, in bytes, with
s = seq_length / CP (tokens per CP rank), b = micro-batch, h = hidden, a = heads, g = KV groups,
d = head dim, f = ffn hidden, G = 2 for SwiGLU, e = bytes per activation (2 for bf16), t = TP:

    replicated across TP (divided by t only under sequence parallelism):
        4·e·s·b·h       inputs of the two norms and of the QKV and fc1 matmuls
        2·s·b·h         the two 1-byte hidden-dropout masks (only when hidden_dropout > 0)
    sharded across TP (divided by t):
        e·s·b·(a·d + 2·g'·d)   Q, K, V kept for the score/value matmuls (g' = g with fused
                                attention, a without it: the unfused path expands K/V to a heads)
        e·s·b·a·d              input of the output projection (= fused attention's output)
        e·s·b·(G·f + f)        fc1 output (SwiGLU/GeLU input) and fc2 input
        unfused attention only: e·a·s²·b softmax output, plus a·s²·b mask and e·a·s²·b dropout
                                output when attention_dropout > 0
        fused attention only:   4·a·s·b softmax statistics (fp32)

For GPT-3 (g = a, a·d = h, f = 4h, G = 1, e = 2, dropout on, unfused) this is exactly
Korthikanti's s·b·h·(10 + 24/t + 5·a·s/(h·t)) without SP and s·b·h/t·(34 + 5·a·s/h) with SP.
Selective recompute drops the attention score terms (s² or statistics); full recompute keeps only
each layer's input (e·s·b·h, /t under SP) plus one recompute group's full activations while it
runs its backward. The last stage adds the logits kept by the vocab-parallel cross entropy in
fp32 (4·s·b·V/t) and the final norm / output-layer inputs.

In-flight micro-batches (Narayanan et al. 2021): with 1F1B, stage r holds min(p − r, m) micro-
batches; with the interleaved schedule (v chunks) stage r holds min(2·(p − r − 1) + (v − 1)·p + 1,
m·v) chunk-micro-batches of L/(p·v) layers each, i.e. the first stage holds L·(1 + (p−1)/(p·v))
layers' worth, the (1 + (p−1)/(p·v)) factor of Korthikanti et al.

Weights/grads/optimizer (mixed bf16, Megatron defaults): 2-byte weights, 4-byte fp32 gradient
buffer (gradients accumulate and reduce in fp32), 12 bytes of optimizer state (fp32 main weights
+ Adam m and v) per parameter, sharded over the DP x CP group by the distributed optimizer:
bytes/param = 2 + 4 + 12/(d·c). fp32 training: 4 + 4 + 8/(d·c). Gradients are 2 bytes without
grad_reduce_in_fp32. Megatron-FSDP: its exact per-rank buffers (megatron_fsdp_memory: padded groups, fp32
main weights even for fp32 training) plus its unsharded buckets in flight (embeddings and output layer, the
all-gather prefetch window and the reduce-scatter queue), modelled from its code.

FP8 (Transformer Engine): the inputs the FP8 linear layers save (norm outputs, proj and fc2 inputs) are their
1-byte casts; the attention output is kept twice (bf16 by flash attention, FP8 by linear_proj). The local
(unfused) spec has its own formula, local_layer_activation_bytes, checked byte-for-byte on CPU. Uneven
pipeline stages take their layer counts from config/layout_rules.pipeline_layer_split; the peak is the worst
stage. Totals add memory_overhead_gib and allocator_fragmentation x activations (ClusterConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.params import params_per_rank

GIB = 1024**3


def _gated(w: Workload) -> int:
    return 2 if w.model.activation.lower() in ("swiglu", "geglu", "reglu") else 1


def act_bytes(w: Workload) -> int:
    return 4 if w.precision == "fp32" else 2


def _fp8_input_bytes(w: Workload) -> int:
    """Bytes per element of what an FP8 linear layer saves of its input: TE keeps the FP8 cast (1 byte)."""
    return 1 if w.fp8 else act_bytes(w)


def layer_activation_bytes(w: Workload, lay: Layout, *, drop_attention_scores: bool = False) -> float:
    """Bytes one layer keeps for backward, one micro-batch, no recompute (see module docstring)."""
    if w.transformer_impl == "local":
        return local_layer_activation_bytes(w, lay, drop_attention_scores=drop_attention_scores)
    m = w.model
    e = act_bytes(w)
    e_in = _fp8_input_bytes(w)
    s = w.seq_length / lay.cp
    b = lay.micro_batch_size
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    t = lay.tp
    sp_div = t if lay.sequence_parallel else 1
    # the two norms' inputs (bf16) and their outputs = the QKV / fc1 GEMM inputs (FP8 casts under fp8)
    replicated = 2 * e * s * b * h + 2 * e_in * s * b * h
    if w.hidden_dropout > 0:
        replicated += 2 * s * b * h
    kv_heads = g if w.flash_attention else a
    # attention output: kept by the fused attention (bf16) and, under fp8, also as linear_proj's FP8 input
    proj_in = e * s * b * a * d + (s * b * a * d if w.fp8 else 0)
    # fc1 output (SwiGLU input, bf16) and fc2 input (FP8 cast under fp8)
    mlp = e * s * b * _gated(w) * f + e_in * s * b * f
    sharded = e * s * b * (a * d + 2 * kv_heads * d) + proj_in + mlp
    if not drop_attention_scores:
        if w.flash_attention:
            sharded += 4 * a * s * b
        else:
            sharded += e * a * s * s * b
            if w.attention_dropout > 0:
                sharded += (1 + e) * a * s * s * b
    return replicated / sp_div + sharded / t


def local_layer_activation_bytes(w: Workload, lay: Layout, *, drop_attention_scores: bool = False) -> float:
    """Bytes one layer of megatron-core's LOCAL spec keeps (torch ops, no fusion; measured on CPU):
    per norm its input, normalised input, weighted output and the fp-rsqrt (3·e·h + e per token), the QKV
    output (V is a view of it), the rotated Q and K, RoPE's cos/sin tables for Q and for K (4·e·d per
    position, on every TP rank, over the whole local sequence, shared by the micro-batch), SDPA's output
    (= linear_proj's input) and log-sum-exp (fp32),
    fc1's output and three f-wide SwiGLU intermediates (two for a plain MLP)."""
    if w.fp8:
        raise ValueError("--precision fp8 needs --transformer-impl transformer_engine")
    m = w.model
    e = act_bytes(w)
    s = w.seq_length / lay.cp
    b = lay.micro_batch_size
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    t = lay.tp
    sp_div = t if lay.sequence_parallel else 1
    replicated = 2 * (3 * e * h + e) * s * b
    tables = 4 * e * d * s  # [s, 1, 1, d]: shared by the micro-batch's sequences
    mlp = (e * 2 * f + 3 * e * f) if _gated(w) == 2 else 2 * e * f
    sharded = (e * (a + 2 * g) * d + e * (a + g) * d + e * a * d + mlp) * s * b
    if not drop_attention_scores:
        sharded += 4 * a * s * b
    return replicated / sp_div + tables + sharded / t


def layer_input_bytes(w: Workload, lay: Layout) -> float:
    """What a fully recomputed layer keeps: its input hidden state (SP-sharded under SP)."""
    return act_bytes(w) * (w.seq_length / lay.cp) * lay.micro_batch_size * w.model.hidden_size / (
        lay.tp if lay.sequence_parallel else 1)


def inflight_chunk_microbatches(lay: Layout, num_microbatches: int, pp_rank: int) -> int:
    """Chunk-micro-batches whose activations stage pp_rank holds at its peak."""
    p, v, mbs = lay.pp, lay.chunks, num_microbatches
    if v == 1:
        return min(p - pp_rank, mbs)
    return min(2 * (p - pp_rank - 1) + (v - 1) * p + 1, mbs * v)


def stage_layer_counts(w: Workload, lay: Layout) -> list[list[int]]:
    """Layers per [pp_rank][chunk] (uneven stages from megatron-core's split rule)."""
    if (lay.num_layers_in_first_pipeline_stage is None and lay.num_layers_in_last_pipeline_stage is None
            and not lay.account_for_embedding_in_pipeline_split and not lay.account_for_loss_in_pipeline_split):
        n = w.model.num_layers // (lay.pp * lay.chunks)  # the even split, without the rule module's checks
        return [[n] * lay.chunks for _ in range(lay.pp)]
    return lay.stage_layers(w.model.num_layers)


def stage_activation_bytes(w: Workload, lay: Layout, pp_rank: int) -> float:
    """Peak activation bytes on a GPU of pipeline stage pp_rank (all in-flight micro-batches)."""
    chunks = stage_layer_counts(w, lay)[pp_rank]
    layers_per_stage = sum(chunks)
    # interleaved: the in-flight chunk-micro-batches cycle over this rank's chunks, so they average its chunk
    layers_per_chunk = layers_per_stage / lay.chunks
    largest_chunk = max(chunks) if chunks else 0
    chunks_in_flight = inflight_chunk_microbatches(lay, lay.num_microbatches(w.global_batch_size), pp_rank)
    full = layer_activation_bytes(w, lay)
    rc = lay.recompute_granularity
    if rc == "selective":
        per_layer = layer_activation_bytes(w, lay, drop_attention_scores=True)
        total = chunks_in_flight * layers_per_chunk * per_layer
    elif rc == "full":
        group = max(1, lay.recompute_num_layers or 1)
        inp = layer_input_bytes(w, lay)
        if lay.recompute_method == "block":
            # The first `group` layers of each chunk are recomputed, the rest keep everything.
            n_rc = min(group, largest_chunk)
            per_chunk = sum(min(n_rc, c) * inp + max(0, c - n_rc) * full for c in chunks) / lay.chunks
            total = chunks_in_flight * per_chunk + min(n_rc, largest_chunk) * full
        else:
            # uniform: a checkpoint (one input) per group of `group` layers, and while one group
            # runs its backward its layers' full activations are live.
            per_chunk = sum(-(-c // group) for c in chunks) / lay.chunks * inp
            total = chunks_in_flight * per_chunk + min(group, largest_chunk) * full
    else:
        total = chunks_in_flight * layers_per_chunk * full
    if pp_rank == lay.pp - 1:
        total += last_stage_extra_bytes(w, lay)
    return total


def last_stage_extra_bytes(w: Workload, lay: Layout) -> float:
    """Final norm and output-layer inputs plus the fp32 logits of the cross entropy (one micro-batch)."""
    s = w.seq_length / lay.cp
    b = lay.micro_batch_size
    vocab = w.model.padded_vocab_size(lay.tp)
    sp_div = lay.tp if lay.sequence_parallel else 1
    return 2 * act_bytes(w) * s * b * w.model.hidden_size / sp_div + 4 * s * b * vocab / lay.tp


def bytes_per_param(w: Workload, lay: Layout) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter on one GPU.

    Mixed precision (bf16 and fp8 alike: TE keeps bf16 weights and casts them to FP8 once per step):
    2-byte weights, a 4-byte gradient buffer (2 without grad_reduce_in_fp32), 12 bytes of fp32 main
    weights + Adam m, v (10 with optimizer_param_remainders: only the 16 low bits of each fp32 main weight
    are kept, the high 16 are the bf16 weight). The distributed optimizer shards the optimizer bytes over
    DP x CP. Under Megatron-FSDP this is the unpadded average (stage_memory uses the exact per-rank buffers,
    megatron_fsdp_memory): it keeps fp32 main weights even for fp32 training (12 optimizer bytes, not 8) and
    shards what its sharding strategy says."""
    shard = lay.dp * lay.cp
    if lay.use_megatron_fsdp:
        wb, gb = _fsdp_weight_bytes(w, lay), _fsdp_grad_bytes(w, lay)
        strategy = lay.data_parallel_sharding_strategy
        return (wb / (shard if strategy == "optim_grads_params" else 1),
                gb / (shard if strategy in ("optim_grads", "optim_grads_params") else 1),
                12.0 / (1 if strategy == "no_shard" else shard))
    opt_shard = shard if lay.use_distributed_optimizer else 1
    if w.precision == "fp32":
        wb, gb, ob = 4.0, 4.0, 8.0
    else:
        wb, gb = 2.0, (4.0 if lay.grad_reduce_in_fp32 else 2.0)
        ob = 10.0 if lay.optimizer_param_remainders else 12.0
    return wb, gb, ob / opt_shard


def _fsdp_weight_bytes(w: Workload, lay: Layout) -> float:
    """Megatron-FSDP's model-weight buffer dtype: the parameters' (fp32, bf16; uint8 for FP8 parameters)."""
    return 4.0 if w.precision == "fp32" else 1.0 if (w.fp8 and lay.fp8_param_gather) else 2.0


def _fsdp_grad_bytes(w: Workload, lay: Layout) -> float:
    return 4.0 if (w.precision == "fp32" or lay.grad_reduce_in_fp32) else 2.0


@dataclass(frozen=True)
class FsdpMemory:
    """Megatron-FSDP's bytes on one GPU (the worst DP rank of the stage)."""

    weights_bytes: float  # model-weight buffer (shard, or all under optim / optim_grads)
    grads_bytes: float  # main-gradient buffer
    optimizer_bytes: float  # fp32 main-weight buffer + Adam m and v over the rank's real elements
    gathered_bytes: float  # transient unsharded buckets (see megatron_fsdp_memory)


# megatron_fsdp.py: its all-gather prefetch and reduce-scatter queue are sized by a "communication unit" of
# max(1e9, 2 x the mean parameters of an FSDP unit) elements (prefetch: half of it)
FSDP_COMMUNICATION_UNIT_MIN = 1_000_000_000


def megatron_fsdp_memory(w: Workload, lay: Layout, pp_rank: int = 0) -> FsdpMemory:
    """Megatron-FSDP's per-rank buffers from its exact layout (params.megatron_fsdp_shards), in bytes.

    Persistent, exact (test_perf_params_builder checks them against the built buffers): model weights, fp32
    main weights, gradients, and Adam's two fp32 moments over this rank's real parameter elements (the worst
    DP rank: ranks differ by the padding they own).

    Transient (unsharded buckets), modelled from megatron-fsdp's hooks and pipelines, not measured (its backward
    does not run on gloo here): the group outside the FSDP units (embeddings, final norm, output layer) is
    gathered at the first forward and kept through the backward, its gradients from the output layer's
    backward to the end. Under optim_grads_params the running layer's weights are gathered with a prefetch of
    the next layers until at least half a communication unit (FSDP_COMMUNICATION_UNIT_MIN) is in flight, and
    unreduced layer gradients wait in the reduce-scatter queue until it holds more than one communication unit,
    plus the layer accumulating. Under optim_grads (no units) the whole gradient group is unsharded through the
    backward. optim and no_shard keep unsharded weights and gradients anyway (counted as persistent)."""
    from hcx_megatron.perf.params import chunk_param_shapes, megatron_fsdp_shards

    layers = stage_layer_counts(w, lay)[pp_rank]
    group = lay.dp * lay.cp
    strategy = lay.data_parallel_sharding_strategy
    wb, gb = _fsdp_weight_bytes(w, lay), _fsdp_grad_bytes(w, lay)
    weights = grads = optimizer = gathered = 0.0
    for c in range(lay.chunks):
        shapes = chunk_param_shapes(w.model, lay.tp, lay.pp, pp_rank, lay.vpp, c, layers_in_chunk=layers[c])
        s = megatron_fsdp_shards(shapes, group, strategy, lay.ddp_bucket_size)
        weights += s.model_weight_elements * wb
        grads += s.main_grad_elements * gb
        optimizer += s.main_weight_elements * 4.0 + 8.0 * max(s.optimizer_elements_per_dp_rank)
        if group == 1:
            continue
        if strategy == "optim_grads_params":
            outside = sum(b.numel for b in s.buckets if b.unit is None)
            units = [b for b in s.buckets if b.unit is not None]
            gathered += outside * (wb + gb)
            if units:
                unit = max(b.numel for b in units)
                mean_params = sum(k for b in units for _, _, k in b.items) // len(units)
                comm_unit = max(FSDP_COMMUNICATION_UNIT_MIN, 2 * mean_params)
                prefetched = min(len(units) - 1, -(-(comm_unit // 2) // unit))
                queued = min(len(units), comm_unit // unit + 2)
                gathered += (1 + prefetched) * unit * wb + queued * unit * gb
        elif strategy == "optim_grads":
            gathered += sum(b.numel for b in s.buckets) * gb
    return FsdpMemory(weights_bytes=weights, grads_bytes=grads, optimizer_bytes=optimizer, gathered_bytes=gathered)


@dataclass(frozen=True)
class MemoryBreakdown:
    pp_rank: int
    params: int  # parameter count on this GPU
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    overhead_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.overhead_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def as_gib(self) -> dict[str, float]:
        return {k: getattr(self, k + "_bytes") / GIB
                for k in ("weights", "grads", "optimizer", "activations", "overhead", "total")}


def stage_memory(w: Workload, lay: Layout, cluster: ClusterConfig, pp_rank: int) -> MemoryBreakdown:
    layers = sum(stage_layer_counts(w, lay)[pp_rank])
    n = params_per_rank(w.model, lay.tp, lay.pp, pp_rank, lay.vpp, layers_on_rank=layers)
    act = stage_activation_bytes(w, lay, pp_rank) * cluster.perf.activation_memory_factor
    overhead = cluster.memory_overhead_gib * GIB + cluster.allocator_fragmentation * act
    if lay.use_megatron_fsdp:
        f = megatron_fsdp_memory(w, lay, pp_rank)
        # the gathered (unsharded) buckets count as weights, as the per-layer all-gather buffers always have
        return MemoryBreakdown(pp_rank=pp_rank, params=n, weights_bytes=f.weights_bytes + f.gathered_bytes,
                               grads_bytes=f.grads_bytes, optimizer_bytes=f.optimizer_bytes, activations_bytes=act,
                               overhead_bytes=overhead)
    bw, bg, bo = bytes_per_param(w, lay)
    return MemoryBreakdown(pp_rank=pp_rank, params=n, weights_bytes=n * bw, grads_bytes=n * bg,
                           optimizer_bytes=n * bo, activations_bytes=act, overhead_bytes=overhead)


def peak_memory(w: Workload, lay: Layout, cluster: ClusterConfig) -> MemoryBreakdown:
    """The most loaded pipeline stage's memory (what decides whether the layout fits)."""
    # Even stages: stage 0 holds the most in-flight micro-batches and the embedding, the last the output
    # layer and logits, so those two bound the peak; uneven stages can move it anywhere, so check all.
    uneven = (lay.num_layers_in_first_pipeline_stage is not None or lay.num_layers_in_last_pipeline_stage
              is not None or lay.account_for_embedding_in_pipeline_split or lay.account_for_loss_in_pipeline_split)
    ranks = range(lay.pp) if uneven else sorted({0, lay.pp - 1})
    return max((stage_memory(w, lay, cluster, r) for r in ranks), key=lambda mb: mb.total_bytes)


def fits(mem: MemoryBreakdown, cluster: ClusterConfig) -> bool:
    return mem.total_bytes <= cluster.hbm_gib * GIB * cluster.usable_memory_fraction


__all__ = [
    "GIB",
    "layer_activation_bytes",
    "local_layer_activation_bytes",
    "layer_input_bytes",
    "stage_layer_counts",
    "inflight_chunk_microbatches",
    "stage_activation_bytes",
    "last_stage_extra_bytes",
    "bytes_per_param",
    "FsdpMemory",
    "megatron_fsdp_memory",
    "FSDP_COMMUNICATION_UNIT_MIN",
    "MemoryBreakdown",
    "stage_memory",
    "peak_memory",
    "fits",
]
