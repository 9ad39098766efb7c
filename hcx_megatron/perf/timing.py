"""Time per training step for a layout on a cluster (docs/perf.md "Time per step").

    t_step = m · t_mb(slowest stage) + (p − 1)/v · mean_r t_mb(r)  +  exposed DP / FSDP communication
             + optimizer + fixed overhead

t_mb(r) is one micro-batch through all v chunks of stage r (layers from the pipeline split, uneven stages
included; the last stage adds the logits):
- compute: linear GEMMs at peak · matmul_efficiency · w/(w + matmul_half_width), w = h/TP (× fp8_speedup under
  FP8); flash attention (causal half) at attention_efficiency · peak · L/(L + attention_half_length), L = s/CP;
  element-wise traffic and FP8 casts over HBM bandwidth; recompute re-runs forwards;
- TP collectives: per layer 2 all-reduce equivalents forward and 2 backward (all-gather + reduce-scatter under
  SP move the same bytes), 2 more per fully-recomputed layer; each moves 2·(t−1)/t · e·b·(s/CP)·h bytes;
  --tp-comm-overlap hides them behind the GEMMs except what the GEMMs cannot cover (at least 1/TP);
- CP ring attention: (c−1) K/V exchanges per layer and pass, hidden behind the attention blocks except the
  per-step latency and at least one exchange per pass;
- PP point-to-point: 2·v sends of e·b·(s/CP)·h (/TP under SP) per micro-batch; the interleaved schedule
  (overlap_p2p_comm) exposes only their latency.
DP (over the DP·CP group, size D): reduce-scatter of the gradients (fp32 or bf16) and all-gather of bf16
weights (FP8 with fp8_param_gather) under the distributed optimizer ((D−1)/D of the bytes each), an all-reduce (2·(D−1)/D) without it.
With --overlap-grad-reduce / --overlap-param-gather they hide behind the last micro-batch's backward / the
first one's forward, except one bucket. Megatron-FSDP gathers weights twice and reduce-scatters gradients once
per micro-batch, prefetched a layer ahead.
Links: a group whose members sit in one node runs at NVLink speed, otherwise at the per-NIC inter-node speed
times the members per node when multi_rail (Megatron orders ranks TP fastest, then CP, DP, PP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.flops import hardware_flops_per_token, layer_forward_flops_per_token, model_flops_per_token
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import act_bytes, stage_layer_counts
from hcx_megatron.perf.params import params_per_rank

DDP_BUCKET_PARAMS = 40_000_000  # Megatron-LM's default bucket: max(40M, 1M x DP) parameters


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # m micro-batches of matmul work on the slowest stage
    tp_comm_s: float
    cp_comm_s: float  # exposed part only
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float  # exposed part only
    dp_comm_total_s: float  # before overlap
    optimizer_s: float
    overhead_s: float
    num_microbatches: int
    bubble_fraction: float  # (p − 1)/(m·v)
    tokens_per_step: int
    world_size: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    peak_tflops: float

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.tp_comm_s + self.cp_comm_s + self.pp_comm_s + self.bubble_s
                + self.dp_comm_s + self.optimizer_s + self.overhead_s)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.total_s

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        return self.tokens_per_sec / self.world_size

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU (no recompute), the MFU numerator."""
        return self.model_flops_per_token * self.tokens_per_sec_per_gpu / 1e12

    @property
    def hardware_tflops_per_gpu(self) -> float:
        """Executed TFLOP/s per GPU (recompute included), Narayanan et al.'s 'achieved' number."""
        return self.hardware_flops_per_token * self.tokens_per_sec_per_gpu / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu / self.peak_tflops

    def as_dict(self) -> dict[str, float]:
        keys = ("compute_s", "tp_comm_s", "cp_comm_s", "pp_comm_s", "bubble_s", "dp_comm_s", "optimizer_s",
                "overhead_s")
        out = {k: getattr(self, k) for k in keys}
        out.update(total_s=self.total_s, tokens_per_sec_per_gpu=self.tokens_per_sec_per_gpu,
                   tflops_per_gpu=self.tflops_per_gpu, mfu=self.mfu, bubble_fraction=self.bubble_fraction)
        return out


def achieved_matmul_tflops(w: Workload, lay: Layout, cluster: ClusterConfig) -> float:
    """Achieved BF16 GEMM rate per GPU (TFLOP/s) for this layout's per-GPU GEMM width."""
    width = w.model.hidden_size / lay.tp
    p = cluster.perf
    return cluster.peak_tflops * p.matmul_efficiency * width / (width + p.matmul_half_width)


def _link(cluster: ClusterConfig, group_span: int, stride: int = 1) -> tuple[float, float]:
    """(bytes/s, latency s) of a group whose members span `group_span` consecutive ranks, `stride` apart.

    Across nodes every GPU has its own NIC and NCCL runs one ring per NIC (rail-optimised), so a group with
    k members in each node moves k NICs' worth of bytes per ring step (never more than NVLink)."""
    nvlink = cluster.nvlink_bandwidth_gbps * 1e9 * cluster.perf.nvlink_efficiency
    if group_span <= cluster.gpus_per_node:
        return nvlink, cluster.intra_node_latency_us * 1e-6
    members_per_node = max(1, cluster.gpus_per_node // stride) if stride < cluster.gpus_per_node else 1
    nic = cluster.internode_bandwidth_gbps * 1e9 * cluster.perf.internode_efficiency
    rails = members_per_node if cluster.perf.multi_rail else 1
    return min(nvlink, rails * nic), cluster.inter_node_latency_us * 1e-6


def _ring(n: int, nbytes: float, link: tuple[float, float], factor: float) -> float:
    """Ring collective time: factor·(n−1)/n of the bytes over the link plus per-step latency."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link
    return factor * (n - 1) / n * nbytes / bw + factor * (n - 1) * lat


def fp8_cast_bytes_per_token(w: Workload, lay: Layout) -> float:
    """HBM bytes per token and layer that Transformer Engine spends quantising FP8 GEMM operands.

    Forward: the inputs of linear_qkv, linear_proj, linear_fc1, linear_fc2 (h, a·d, h, f wide); backward:
    the output gradients of the same four GEMMs ((a+2g)·d, h, G·f, h). Each element is read in bf16 (2 B),
    written in FP8 (1 B) and written again transposed for the weight-gradient GEMM (1 B, Hopper FP8 GEMMs
    take only TN layouts); current ("tensorwise") scaling reads it once more for its amax (2 B) before the
    cast, delayed scaling takes the scale from the amax history. Sharded over TP (SP for the h-wide ones)."""
    if not w.fp8:
        return 0.0
    m = w.model
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    gate = 2 if m.activation.lower() in ("swiglu", "geglu", "reglu") else 1
    elements = (h + a * d + h + f) + ((a + 2 * g) * d + h + gate * f + h)
    per_element = 4.0 + (2.0 if w.fp8_recipe == "tensorwise" else 0.0)
    return per_element * elements / lay.tp


@dataclass(frozen=True)
class _StageTime:
    compute_s: float  # one micro-batch, all chunks of the stage
    tp_comm_s: float
    cp_comm_s: float
    pp_comm_s: float
    bwd_share: float  # backward part of compute (the window the DP gradient reduce can hide in)


def _stage_microbatch_time(w: Workload, lay: Layout, cluster: ClusterConfig, chunk_layers: list[int],
                           has_logits: bool) -> _StageTime:
    m = w.model
    layers = sum(chunk_layers)
    e = act_bytes(w)
    s, b, h = w.seq_length, lay.micro_batch_size, m.hidden_size
    s_loc = s / lay.cp
    tp, cp, v = lay.tp, lay.cp, lay.chunks
    perf = cluster.perf
    vocab = m.padded_vocab_size(tp)
    tokens_gpu = b * s / (tp * cp)

    parts = layer_forward_flops_per_token(m, s, causal=w.flash_attention)  # flash skips the masked half
    linear_fwd = parts["qkv"] + parts["attn_proj"] + parts["mlp"]
    attn_fwd = parts["core_attention"]
    rate = achieved_matmul_tflops(w, lay, cluster) * 1e12
    lin_rate = rate * (perf.fp8_speedup if w.fp8 else 1.0)  # FP8 runs linear layers only; logits stay bf16
    attn_rate = cluster.peak_tflops * 1e12 * perf.attention_efficiency if perf.attention_efficiency > 0 else rate
    if perf.attention_half_length > 0:
        # flash-attention kernels run further from peak on short blocks: under CP each ring step is one
        # (s/CP)-long query chunk against one (s/CP)-long K/V chunk
        block = s / cp
        attn_rate *= block / (block + perf.attention_half_length)
    hbm = cluster.hbm_bandwidth_gbps * 1e9
    # memory-bound element-wise work (norms, residual adds, RoPE, SwiGLU, bias/dropout), fwd + bwd
    elem_bytes = perf.elementwise_passes * e * (h + m.ffn_hidden_size) / tp

    t_lin = linear_fwd * tokens_gpu / lin_rate
    t_attn = attn_fwd * tokens_gpu / attn_rate
    tokens_cp = b * s / cp  # the per-token byte counts below are already per TP rank
    t_elem = elem_bytes * tokens_cp / hbm
    t_cast = fp8_cast_bytes_per_token(w, lay) * tokens_cp / hbm
    fwd_layer = t_lin + t_attn + t_elem / 3 + t_cast / 2
    full_layer = 3 * (t_lin + t_attn) + t_elem + t_cast

    rc = lay.recompute_granularity
    if rc == "full":
        # uniform recomputes every layer; block the first recompute_num_layers of each model chunk
        n_rc = layers if lay.recompute_method != "block" else sum(
            min(lay.recompute_num_layers or 1, c) for c in chunk_layers)
    else:
        n_rc = 0
    recompute = n_rc * fwd_layer + (layers * t_attn if rc == "selective" else 0.0)
    t_logits = 3 * 2.0 * h * vocab * tokens_gpu / rate if has_logits else 0.0
    compute = layers * full_layer + recompute + t_logits
    bwd = layers * (full_layer - fwd_layer) + recompute + (t_logits * 2 / 3)
    bwd_share = bwd / compute if compute > 0 else 0.0

    # --- tensor parallel collectives: 4 all-reduce equivalents per layer (+2 per recomputed layer)
    tp_link = _link(cluster, tp)
    ar_bytes = e * b * s_loc * h
    n_ar = 4 * layers + 2 * n_rc + (2 if has_logits else 0)
    t_tp = n_ar * _ring(tp, ar_bytes, tp_link, 2.0)
    if lay.tp_comm_overlap and tp > 1:
        # TE userbuffers split each all-gather / reduce-scatter into TP ring steps pipelined with the
        # matching GEMM chunks: only what the GEMMs cannot cover, and at least one step, stays exposed.
        gemm = layers * 3 * t_lin + n_rc * t_lin
        t_tp = max(t_tp - gemm, t_tp / tp)

    # --- context parallel ring attention: (c−1) K/V exchanges per layer and pass, overlapped with the
    # attention blocks, but never the per-step latency, and at least one exchange is exposed per pass
    t_cp = 0.0
    if cp > 1:
        kv_bytes = 2 * e * b * s_loc * m.num_query_groups * m.head_dim / tp
        passes = 3 + (1 if rc == "full" else 0)  # fwd K/V, bwd K/V + dK/dV, recompute fwd
        cp_link = _link(cluster, tp * cp, stride=tp)
        step = kv_bytes / cp_link[0]
        t_comm = passes * (cp - 1) * step
        t_attn_total = (3 + (1 if rc in ("full", "selective") else 0)) * t_attn
        t_cp = layers * (max(step * passes, t_comm - t_attn_total) + passes * (cp - 1) * cp_link[1])

    # --- pipeline point-to-point: 2·v sends of one activation per micro-batch; the interleaved schedule
    # overlaps them with compute (overlap_p2p_comm), 1F1B waits for them
    t_pp = 0.0
    if lay.pp > 1:
        p2p_bytes = e * b * s_loc * h / (tp if lay.sequence_parallel else 1)
        stride = tp * cp * lay.dp
        # each GPU sends to its peer in the next stage over its own NIC: one rail
        pp_link = _link(cluster, stride * lay.pp, cluster.gpus_per_node) if stride < cluster.gpus_per_node \
            else _link(cluster, cluster.gpus_per_node + 1, cluster.gpus_per_node)
        one = p2p_bytes / pp_link[0] + pp_link[1]
        t_pp = 2 * v * (pp_link[1] if (lay.overlap_p2p_comm and v > 1) else one)
    return _StageTime(compute_s=compute, tp_comm_s=t_tp, cp_comm_s=t_cp, pp_comm_s=t_pp, bwd_share=bwd_share)


def step_time(w: Workload, lay: Layout, cluster: ClusterConfig) -> StepTime:
    m = w.model
    problems = lay.check(w)
    if problems:
        raise ValueError(f"layout {lay.label()} cannot run this workload: {'; '.join(problems)}")
    s = w.seq_length
    tp, pp, cp, v = lay.tp, lay.pp, lay.cp, lay.chunks
    mbs = lay.num_microbatches(w.global_batch_size)
    vocab = m.padded_vocab_size(tp)
    chunk_layers = stage_layer_counts(w, lay)
    stage_layers = [sum(c) for c in chunk_layers]

    # every stage's micro-batch time; the slowest stage paces the pipeline, fill and drain cost the others
    stages = [_stage_microbatch_time(w, lay, cluster, c, r == pp - 1) for r, c in enumerate(chunk_layers)]
    walls = [st.compute_s + st.tp_comm_s + st.cp_comm_s + st.pp_comm_s for st in stages]
    slow = max(range(pp), key=lambda r: walls[r])
    st = stages[slow]
    bubble_fraction = (pp - 1) / (mbs * v)
    t_bubble = (pp - 1) / v * (sum(walls) / pp)

    # --- data parallel (over DP x CP) gradient reduce / weight gather
    group = lay.dp * cp
    n_params = max(params_per_rank(m, tp, pp, r, lay.vpp, layers_on_rank=stage_layers[r]) for r in range(pp))
    grad_bytes = (4.0 if (lay.grad_reduce_in_fp32 or w.precision == "fp32") else 2.0) * n_params
    weight_bytes = (4.0 if w.precision == "fp32" else 1.0 if (w.fp8 and lay.fp8_param_gather) else 2.0) * n_params
    dp_link = _link(cluster, tp * group, stride=tp)
    bucket = lay.ddp_bucket_size or max(DDP_BUCKET_PARAMS, 1_000_000 * group)
    n_buckets = max(1, math.ceil(n_params / bucket))
    t_mb = st.compute_s
    if lay.use_megatron_fsdp:
        # every micro-batch all-gathers the weights before forward and backward and reduce-scatters the
        # gradients, prefetched one layer ahead: exposed where it outlasts the compute, and the first layer
        per_mb = 2 * _ring(group, weight_bytes, dp_link, 1.0) + _ring(group, grad_bytes, dp_link, 1.0)
        layers_here = max(1, stage_layers[slow])
        exposed = mbs * (max(0.0, per_mb - t_mb) + per_mb / layers_here)
        t_rs = t_ag = 0.0
        dp_total = mbs * per_mb
        dp_exposed = exposed
    else:
        if lay.use_distributed_optimizer:
            t_rs = _ring(group, grad_bytes, dp_link, 1.0)
            t_ag = _ring(group, weight_bytes, dp_link, 1.0)
        else:
            t_rs, t_ag = _ring(group, grad_bytes, dp_link, 2.0), 0.0
        exposed_rs = max(t_rs / n_buckets, t_rs - st.bwd_share * t_mb) if lay.overlap_grad_reduce else t_rs
        exposed_ag = (max(t_ag / n_buckets, t_ag - (1 - st.bwd_share) * t_mb)
                      if lay.overlap_param_gather else t_ag)
        dp_total = t_rs + t_ag
        dp_exposed = exposed_rs + exposed_ag

    # --- optimizer: memory-bound Adam over this rank's shard plus grad-norm / zeroing passes
    sharded = lay.use_distributed_optimizer or lay.use_megatron_fsdp
    shard = n_params / (group if sharded else 1)
    t_opt = (32.0 * shard + 8.0 * n_params) / (cluster.hbm_bandwidth_gbps * 1e9 * 0.7)

    return StepTime(
        compute_s=mbs * st.compute_s,
        tp_comm_s=mbs * st.tp_comm_s,
        cp_comm_s=mbs * st.cp_comm_s,
        pp_comm_s=mbs * st.pp_comm_s,
        bubble_s=t_bubble,
        dp_comm_s=dp_exposed,
        dp_comm_total_s=dp_total,
        optimizer_s=t_opt,
        overhead_s=cluster.perf.step_overhead_s,
        num_microbatches=mbs,
        bubble_fraction=bubble_fraction,
        tokens_per_step=w.tokens_per_step,
        world_size=lay.world_size,
        model_flops_per_token=model_flops_per_token(m, s, padded_vocab=vocab, causal=True),
        hardware_flops_per_token=hardware_flops_per_token(
            m, s, lay.recompute_granularity, recompute_method=lay.recompute_method,
            recompute_num_layers=lay.recompute_num_layers, pipeline_model_parallel_size=pp, padded_vocab=vocab),
        peak_tflops=cluster.fp8_peak_tflops if w.fp8 else cluster.peak_tflops,
    )


__all__ = ["StepTime", "step_time", "achieved_matmul_tflops", "fp8_cast_bytes_per_token", "DDP_BUCKET_PARAMS"]
