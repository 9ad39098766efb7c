"""Validation data: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC'21), Table 1 — GPT models of 1.7B to 1T parameters trained on
Selene (DGX A100 80 GB: 312 TFLOP/s fp16/bf16 peak, NVLink 3, 8 x 200 Gb/s HDR InfiniBand per
node), sequence length 2048, vocabulary 51,200, achieved TFLOP/s per GPU counted with full
activation recomputation (their eq. 3: 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))).

The table gives model shape, TP, PP, GPU count, global batch and the achieved TFLOP/s; it does not
give micro-batch sizes or the schedule. ASSUMED here: micro-batch 1, plain (non-interleaved)
1F1B, full recompute, no distributed optimizer and no DP overlap (2021 Megatron-LM), bf16 with fp32
gradient all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.perf.calibrate import Measurement
from hcx_megatron.perf.cluster import ClusterConfig, PerfParams
from hcx_megatron.perf.flops import hardware_flops_per_token
from hcx_megatron.perf.layout import Layout, Workload


@dataclass(frozen=True)
class PaperRow:
    params_b: float  # billions, as printed
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops_per_gpu: float  # achieved (hardware, with recompute)
    pct_peak: int


TABLE1 = (
    PaperRow(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    PaperRow(3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    PaperRow(7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    PaperRow(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    PaperRow(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    PaperRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    PaperRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    PaperRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    PaperRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    PaperRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
)
SEQ, VOCAB = 2048, 51200


def selene_cluster(perf: PerfParams | None = None) -> ClusterConfig:
    return ClusterConfig(name="selene", gpu="A100-SXM4-80GB", gpus_per_node=8, peak_tflops=312.0, hbm_gib=80.0,
                         hbm_bandwidth_gbps=2039.0, nvlink_bandwidth_gbps=300.0, internode_bandwidth_gbps=25.0,
                         memory_overhead_gib=4.0, perf=perf or PerfParams())


def gpt_model(row: PaperRow) -> ModelConfig:
    """GPT-3 architecture: MHA, 4h GeLU MLP with biases, LayerNorm, learned positions, tied embeddings."""
    return ModelConfig(name=f"gpt-{row.params_b}B", num_layers=row.layers, hidden_size=row.hidden,
                       ffn_hidden_size=4 * row.hidden, num_attention_heads=row.heads, num_query_groups=row.heads,
                       vocab_size=VOCAB, make_vocab_size_divisible_by=128, max_position_embeddings=SEQ,
                       untie_embeddings_and_output_weights=False, normalization="LayerNorm", activation="gelu",
                       add_bias_linear=True, position_embedding_type="learned_absolute")


def row_case(row: PaperRow) -> tuple[Workload, Layout]:
    dp = row.gpus // (row.tp * row.pp)
    w = Workload(model=gpt_model(row), seq_length=SEQ, global_batch_size=row.batch, precision="bf16",
                 flash_attention=False, hidden_dropout=0.1, attention_dropout=0.1)
    lay = Layout(tp=row.tp, pp=row.pp, dp=dp, micro_batch_size=1, sequence_parallel=False,
                 recompute_granularity="full", recompute_method="uniform", use_distributed_optimizer=False,
                 overlap_grad_reduce=False, overlap_param_gather=False)
    return w, lay


def row_measurement(row: PaperRow) -> Measurement:
    """The paper's TFLOP/s turned into a step time with the same (hardware, recompute) FLOP count."""
    w, lay = row_case(row)
    flops_step = hardware_flops_per_token(w.model, SEQ, "full", padded_vocab=VOCAB) * w.tokens_per_step
    return Measurement(workload=w, layout=lay, step_time_s=flops_step / (row.gpus * row.tflops_per_gpu * 1e12),
                       label=f"{row.params_b}B")


def training_days(params: float, tokens: float, gpus: int, tflops_per_gpu: float) -> float:
    """Narayanan et al.'s end-to-end estimate 8·T·P / (n·X) (full recompute), in days."""
    return 8.0 * tokens * params / (gpus * tflops_per_gpu * 1e12) / 86400.0


def validation_table(leave_one_out: bool = True) -> tuple[str, dict]:
    """Markdown table of predicted vs published TFLOP/s per GPU for every row of Table 1.

    Columns: the fit on all ten rows (in-sample) and, for each row, a fit on the other nine
    (leave-one-out: a prediction for a configuration the knobs never saw).
    """
    from hcx_megatron.perf.calibrate import fit
    from hcx_megatron.perf.memory import peak_memory
    from hcx_megatron.perf.timing import step_time

    data = [row_measurement(r) for r in TABLE1]
    full = fit(selene_cluster(), data)
    loo = []
    if leave_one_out:
        for i in range(len(data)):
            res = fit(selene_cluster(), data[:i] + data[i + 1:])
            loo.append(step_time(data[i].workload, data[i].layout, res.cluster).hardware_tflops_per_gpu)
    lines = ["| model | TP | PP | GPUs | batch | paper TFLOP/s (% peak) | predicted (fit on all) | error | "
             "predicted (leave-one-out) | error | pred. bubble | pred. memory GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errs_in, errs_loo = [], []
    for i, (row, d) in enumerate(zip(TABLE1, data)):
        st = step_time(d.workload, d.layout, full.cluster)
        mem = peak_memory(d.workload, d.layout, full.cluster)
        e_in = st.hardware_tflops_per_gpu / row.tflops_per_gpu - 1
        errs_in.append(e_in)
        cells = [f"{row.params_b}B", str(row.tp), str(row.pp), str(row.gpus), str(row.batch),
                 f"{row.tflops_per_gpu:.0f} ({row.pct_peak}%)", f"{st.hardware_tflops_per_gpu:.1f}",
                 f"{100 * e_in:+.1f}%"]
        if loo:
            e_loo = loo[i] / row.tflops_per_gpu - 1
            errs_loo.append(e_loo)
            cells += [f"{loo[i]:.1f}", f"{100 * e_loo:+.1f}%"]
        else:
            cells += ["-", "-"]
        cells += [f"{100 * st.bubble_fraction:.1f}%", f"{mem.total_gib:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = {"fitted": full.fitted, "max_abs_in_sample": max(abs(e) for e in errs_in),
               "rms_in_sample": (sum(e * e for e in errs_in) / len(errs_in)) ** 0.5}
    if errs_loo:
        summary.update(max_abs_loo=max(abs(e) for e in errs_loo),
                       rms_loo=(sum(e * e for e in errs_loo) / len(errs_loo)) ** 0.5)
    return "\n".join(lines), summary


if __name__ == "__main__":
    table, summary = validation_table()
    print(table)
    print(summary)


__all__ = ["PaperRow", "TABLE1", "selene_cluster", "gpt_model", "row_case", "row_measurement", "training_days",
           "validation_table"]
