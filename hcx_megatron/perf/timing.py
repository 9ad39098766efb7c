"""Time per training step for a layout on a cluster.

    t_step = (m + (p − 1)/v) · t_mb  +  exposed DP communication  +  optimizer  +  fixed overhead

t_mb is one micro-batch through the slowest pipeline stage (all its v chunks):
- compute: hardware FLOPs of the stage's layers (recompute included; the last stage adds the
  logits) over TP·CP GPUs, at peak · matmul_efficiency · w/(w + matmul_half_width), w = h/TP;
- TP collectives, not overlapped (Megatron's default): per layer 2 all-reduce equivalents forward
  and 2 backward (all-gather + reduce-scatter under SP move the same bytes), 2 more per
  fully-recomputed layer; each moves 2·(t−1)/t · e·b·(s/CP)·h bytes;
- CP ring attention: (c−1) K/V exchanges per layer, hidden behind the attention math when fast enough;
- PP point-to-point: 2·v sends of e·b·(s/CP)·h (/TP under SP) per micro-batch per stage.
The bubble (p−1)/v · t_mb is the 1F1B / interleaved pipeline bubble fraction (p−1)/(m·v).
DP (over the DP·CP group, size D): reduce-scatter of fp32 gradients and all-gather of bf16
weights under the distributed optimizer ((D−1)/D of the bytes each), an all-reduce
(2·(D−1)/D) without it. With --overlap-grad-reduce / --overlap-param-gather they hide behind the
last micro-batch's backward / the first one's forward, except the last bucket.
Links: a group whose members sit in one node runs at NVLink speed, otherwise at the per-GPU
inter-node speed (Megatron orders ranks TP fastest, then CP, DP, PP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.flops import hardware_flops_per_token, layer_forward_flops_per_token, model_flops_per_token
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import act_bytes
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
    width = w.model.hidden_size / lay.tp
    p = cluster.perf
    return cluster.peak_tflops * p.matmul_efficiency * width / (width + p.matmul_half_width)


def _link(cluster: ClusterConfig, group_span: int) -> tuple[float, float]:
    """(bytes/s, latency s) of a group whose members span `group_span` consecutive ranks."""
    if group_span <= cluster.gpus_per_node:
        return (cluster.nvlink_bandwidth_gbps * 1e9 * cluster.perf.nvlink_efficiency,
                cluster.intra_node_latency_us * 1e-6)
    return (cluster.internode_bandwidth_gbps * 1e9 * cluster.perf.internode_efficiency,
            cluster.inter_node_latency_us * 1e-6)


def _ring(n: int, nbytes: float, link: tuple[float, float], factor: float) -> float:
    """Ring collective time: factor·(n−1)/n of the bytes over the link plus per-step latency."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link
    return factor * (n - 1) / n * nbytes / bw + factor * (n - 1) * lat


def step_time(w: Workload, lay: Layout, cluster: ClusterConfig) -> StepTime:
    m = w.model
    problems = lay.check(w)
    if problems:
        raise ValueError(f"layout {lay.label()} cannot run this workload: {'; '.join(problems)}")
    e = act_bytes(w)
    s, b, h = w.seq_length, lay.micro_batch_size, m.hidden_size
    s_loc = s / lay.cp
    tp, pp, cp, v = lay.tp, lay.pp, lay.cp, lay.chunks
    mbs = lay.num_microbatches(w.global_batch_size)
    vocab = m.padded_vocab_size(tp)
    layers_stage = m.num_layers // pp

    # --- compute per micro-batch on the last (slowest: it adds the logits) stage
    parts = layer_forward_flops_per_token(m, s)
    layer_fwd = sum(parts.values())
    rc = lay.recompute_granularity
    if rc == "full":
        n_rc = layers_stage if lay.recompute_method != "block" else min(lay.recompute_num_layers or 1, layers_stage)
        layer_hw = 3 * layer_fwd * layers_stage + layer_fwd * n_rc
    elif rc == "selective":
        n_rc = 0
        layer_hw = (3 * layer_fwd + parts["core_attention"]) * layers_stage
    else:
        n_rc = 0
        layer_hw = 3 * layer_fwd * layers_stage
    logits_hw = 3 * 2.0 * h * vocab
    tokens_gpu = b * s / (tp * cp)
    rate = achieved_matmul_tflops(w, lay, cluster) * 1e12
    t_compute_mb = (layer_hw + logits_hw) * tokens_gpu / rate
    bwd_share = (2 * layer_fwd * layers_stage + layer_fwd * n_rc + 2 * 2.0 * h * vocab) / (
        3 * layer_fwd * layers_stage + layer_fwd * n_rc + logits_hw)

    # --- tensor parallel collectives (not overlapped)
    tp_link = _link(cluster, tp)
    ar_bytes = e * b * s_loc * h
    n_ar = 4 * layers_stage + 2 * n_rc + 2  # + output layer and embedding
    t_tp_mb = n_ar * _ring(tp, ar_bytes, tp_link, 2.0)

    # --- context parallel ring attention, overlapped with the attention math
    t_cp_mb = 0.0
    if cp > 1:
        kv_bytes = 2 * e * b * s_loc * m.num_query_groups * m.head_dim / tp
        passes = 3 + (1 if rc == "full" else 0)  # fwd K/V, bwd K/V + dK/dV, recompute fwd
        cp_link = _link(cluster, tp * cp)
        t_comm = passes * (cp - 1) * (kv_bytes / cp_link[0] + cp_link[1])
        t_attn = (3 + (1 if rc in ("full", "selective") else 0)) * parts["core_attention"] * tokens_gpu / rate
        t_cp_mb = layers_stage * max(0.0, t_comm - t_attn)

    # --- pipeline point-to-point
    t_pp_mb = 0.0
    if pp > 1:
        p2p_bytes = e * b * s_loc * h / (tp if lay.sequence_parallel else 1)
        stride = tp * cp * lay.dp
        pp_link = _link(cluster, stride * pp) if stride < cluster.gpus_per_node else _link(
            cluster, cluster.gpus_per_node + 1)
        t_pp_mb = 2 * v * (p2p_bytes / pp_link[0] + pp_link[1])

    t_mb = t_compute_mb + t_tp_mb + t_cp_mb + t_pp_mb
    bubble_fraction = (pp - 1) / (mbs * v)
    t_bubble = t_mb * (pp - 1) / v

    # --- data parallel (over DP x CP) gradient reduce / weight gather
    group = lay.dp * cp
    n_params = max(params_per_rank(m, tp, pp, r, lay.vpp) for r in sorted({0, pp - 1}))
    grad_bytes = 4.0 * n_params
    weight_bytes = (4.0 if w.precision == "fp32" else 2.0) * n_params
    dp_link = _link(cluster, tp * group)
    n_buckets = max(1, math.ceil(n_params / max(DDP_BUCKET_PARAMS, 1_000_000 * group)))
    if lay.use_distributed_optimizer:
        t_rs = _ring(group, grad_bytes, dp_link, 1.0)
        t_ag = _ring(group, weight_bytes, dp_link, 1.0)
    else:
        t_rs, t_ag = _ring(group, grad_bytes, dp_link, 2.0), 0.0
    exposed_rs = max(t_rs / n_buckets, t_rs - bwd_share * t_compute_mb) if lay.overlap_grad_reduce else t_rs
    exposed_ag = (max(t_ag / n_buckets, t_ag - (1 - bwd_share) * t_compute_mb)
                  if lay.overlap_param_gather else t_ag)

    # --- optimizer: memory-bound Adam over this rank's shard plus grad-norm / zeroing passes
    shard = n_params / (group if lay.use_distributed_optimizer else 1)
    t_opt = (32.0 * shard + 8.0 * n_params) / (cluster.hbm_bandwidth_gbps * 1e9 * 0.7)

    return StepTime(
        compute_s=mbs * t_compute_mb,
        tp_comm_s=mbs * t_tp_mb,
        cp_comm_s=mbs * t_cp_mb,
        pp_comm_s=mbs * t_pp_mb,
        bubble_s=t_bubble,
        dp_comm_s=exposed_rs + exposed_ag,
        dp_comm_total_s=t_rs + t_ag,
        optimizer_s=t_opt,
        overhead_s=cluster.perf.step_overhead_s,
        num_microbatches=mbs,
        bubble_fraction=bubble_fraction,
        tokens_per_step=w.tokens_per_step,
        world_size=lay.world_size,
        model_flops_per_token=model_flops_per_token(m, s, padded_vocab=vocab),
        hardware_flops_per_token=hardware_flops_per_token(
            m, s, rc, recompute_method=lay.recompute_method, recompute_num_layers=lay.recompute_num_layers,
            pipeline_model_parallel_size=pp, padded_vocab=vocab),
        peak_tflops=cluster.peak_tflops,
    )


__all__ = ["StepTime", "step_time", "achieved_matmul_tflops", "DDP_BUCKET_PARAMS"]
