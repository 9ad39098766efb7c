"""Cluster description (GPU peak, memory, link bandwidths) and the calibratable efficiency knobs.

A cluster is a YAML file of `ClusterConfig` fields (examples/clusters/*.yaml); the H100 DGX
default below is used when none is given. Bandwidths are per GPU and per direction, in GB/s
(1e9 bytes/s), the numbers that ring collectives are limited by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class PerfParams:
    """Efficiencies the step-time model cannot know from a datasheet; `--calibrate` fits them.

    The achieved matmul rate is peak * matmul_efficiency * w / (w + matmul_half_width), where
    w = hidden_size / TP is the per-GPU width of the sharded GEMMs: narrow GEMMs (large TP on a
    small model) run further from peak, which is what Narayanan et al.'s table shows.
    """

    matmul_efficiency: float = 0.6  # asymptotic fraction of peak for wide GEMMs (non-matmul work folded in)
    matmul_half_width: float = 256.0  # per-GPU width at which the GEMM rate is half the asymptote
    nvlink_efficiency: float = 0.8  # achieved NCCL bus bandwidth / nominal, intra-node
    internode_efficiency: float = 0.8  # achieved / nominal, across nodes
    step_overhead_s: float = 0.0  # fixed per-step cost (optimizer launch, data, logging, Python)
    activation_memory_factor: float = 1.0  # multiplies the analytical activation bytes
    # achieved FP8 GEMM rate / achieved BF16 GEMM rate for the same shapes (nominal 2 on Hopper)
    fp8_speedup: float = 1.6
    # fused (flash) attention's achieved fraction of the bf16 peak; 0 = run it at the GEMM rate
    attention_efficiency: float = 0.0
    # block length (tokens, per kernel call: s/CP) at which flash attention runs at half its long-sequence rate;
    # 0 = no length dependence
    attention_half_length: float = 0.0
    # memory-bound element-wise traffic per token and layer, fwd + bwd, in units of e·(h + f)/TP bytes
    # (norms, residual adds, RoPE, SwiGLU); 0 = folded into matmul_efficiency (the pre-FP8 model)
    elementwise_passes: float = 0.0
    # 1: a group with k members per node drives k NICs at once (NCCL rings per rail, DGX H100 / NCCL >= 2.12);
    # 0: one NIC per group (what Narayanan et al.'s 2021 Selene numbers fit)
    multi_rail: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ClusterConfig:
    name: str = "dgx-h100"
    gpu: str = "H100-SXM5-80GB"
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak per GPU
    fp8_peak_tflops: float = 1979.0  # dense FP8 peak (the MFU denominator of fp8 runs)
    hbm_gib: float = 79.6  # H100 SXM5 "80 GB": 81,559 MiB as nvidia-smi reports it
    hbm_bandwidth_gbps: float = 3350.0
    nvlink_bandwidth_gbps: float = 450.0  # NVLink 4: 900 GB/s bidirectional = 450 per direction
    internode_bandwidth_gbps: float = 50.0  # one 400 Gb/s NDR InfiniBand NIC per GPU
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 20.0
    # fixed: CUDA context + kernels (~0.6), NCCL communicators and buffers (~1), cuBLAS/TE workspaces and
    # userbuffers (~1), the rest of the model's temporaries (~0.4)
    memory_overhead_gib: float = 3.0
    allocator_fragmentation: float = 0.05  # caching-allocator slack, as a fraction of the activation bytes
    usable_memory_fraction: float = 1.0  # plan to at most this share of HBM (the overheads above are explicit)
    perf: PerfParams = dataclasses.field(default_factory=PerfParams)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_perf(self, **changes: float) -> "ClusterConfig":
        return dataclasses.replace(self, perf=dataclasses.replace(self.perf, **changes))


# The H100 knobs (examples/clusters/h100.yaml holds the same): matmul_efficiency (the BF16 GEMM rate),
# attention_efficiency and fp8_speedup fitted to the "fit" rows of published_h100.yaml, FP8 and BF16 together
# (python -m hcx_megatron.perf.published --refit; the BF16 rows are what separate the BF16 rate from
# fp8_speedup); the rest are stated priors: attention_half_length 512 tokens, elementwise_passes 20, the link
# efficiencies; multi_rail 1 (DGX H100: one NIC per GPU, NCCL rings per rail).
H100_PERF = PerfParams(matmul_efficiency=0.662, matmul_half_width=256.0, nvlink_efficiency=0.8,
                       internode_efficiency=0.8, step_overhead_s=0.0, activation_memory_factor=1.0,
                       fp8_speedup=1.655, attention_efficiency=0.4215, attention_half_length=512.0,
                       elementwise_passes=20.0, multi_rail=1.0)


def default_cluster() -> ClusterConfig:
    """DGX H100: 8 x H100 SXM 80 GB, NVLink 4 / NVSwitch, 8 x 400 Gb/s NDR per node."""
    return ClusterConfig(perf=dataclasses.replace(H100_PERF))


def cluster_from_dict(data: dict, source: str = "<dict>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of cluster fields, got {type(data).__name__}")
    data = dict(data)
    perf_data = data.pop("perf", None) or {}
    known = {f.name for f in dataclasses.fields(ClusterConfig)} - {"perf"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown cluster field(s) {unknown}; known: {sorted(known | {'perf'})}")
    perf_known = {f.name for f in dataclasses.fields(PerfParams)}
    if not isinstance(perf_data, dict):
        raise ValueError(f"{source}: 'perf' must be a mapping of {sorted(perf_known)}")
    perf_unknown = sorted(set(perf_data) - perf_known)
    if perf_unknown:
        raise ValueError(f"{source}: unknown perf field(s) {perf_unknown}; known: {sorted(perf_known)}")
    cfg = ClusterConfig(**data, perf=PerfParams(**{k: float(v) for k, v in perf_data.items()}))
    for name in ("gpus_per_node", "peak_tflops", "hbm_gib", "nvlink_bandwidth_gbps", "internode_bandwidth_gbps"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{source}: {name} must be > 0, got {getattr(cfg, name)}")
    return cfg


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """Read a cluster YAML; None gives the H100 default."""
    if path is None:
        return default_cluster()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--cluster {path}: no such file")
    with open(p, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return cluster_from_dict(data, source=str(p))


def save_cluster(cfg: ClusterConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


__all__ = ["PerfParams", "ClusterConfig", "H100_PERF", "default_cluster", "cluster_from_dict", "load_cluster",
           "save_cluster"]
