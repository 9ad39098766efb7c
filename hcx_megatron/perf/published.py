"""Published NVIDIA H100 pre-training results (published_h100.yaml) against the model's predictions.

    python -m hcx_megatron.perf.published            # per-row table, RMS on fit and held-out rows
    python -m hcx_megatron.perf.published --refit    # refit the knobs on the "fit" rows only, then the table

FLOP convention for every TFLOP/s number here: NVIDIA's (training/metrics.py step_throughput): 2 FLOPs per
multiply-accumulate, backward = 2 x forward, causal attention counted half, logits over the padded vocabulary.
The comparison itself is on tokens/s/GPU, which needs no FLOP convention.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.perf.calibrate import Measurement, fit
from hcx_megatron.perf.cluster import ClusterConfig, default_cluster
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import GIB, fits, peak_memory
from hcx_megatron.perf.timing import step_time

DATA = Path(__file__).with_name("published_h100.yaml")
# the knobs fitted on the "fit" rows (their values are stored in examples/clusters/h100.yaml / ClusterConfig)
FIT_KNOBS = ("matmul_efficiency", "attention_efficiency")


@dataclass(frozen=True)
class PublishedRow:
    id: str
    source: str  # URL
    model: ModelConfig
    gpus: int
    workload: Workload
    layout: Layout
    tok_s_gpu: float
    tflops_gpu: float
    split: str  # "fit" | "holdout"


def load_rows(path: str | Path = DATA) -> list[PublishedRow]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    models = {name: ModelConfig(name=name, **fields) for name, fields in data["models"].items()}
    rows = []
    for r in data["rows"]:
        m = models[r["model"]]
        tp, pp, cp, vp, gpus = r["tp"], r["pp"], r["cp"], r["vp"], r["gpus"]
        dp = gpus // (tp * pp * cp)
        uneven = m.num_layers % (pp * vp) != 0
        w = Workload(model=m, seq_length=r["seq"], global_batch_size=r["gbs"], precision=r["precision"],
                     fp8_recipe=r.get("recipe") or "delayed")
        lay = Layout(tp=tp, pp=pp, dp=dp, cp=cp, vpp=vp if vp > 1 else None, micro_batch_size=r["mbs"],
                     sequence_parallel=tp > 1, use_megatron_fsdp=bool(r["fsdp"]),
                     grad_reduce_in_fp32=False, tp_comm_overlap=tp > 1,
                     account_for_embedding_in_pipeline_split=uneven, account_for_loss_in_pipeline_split=uneven)
        if r["split"] not in ("fit", "holdout"):
            raise ValueError(f"{path}: row {r['id']}: split must be fit or holdout, got {r['split']!r}")
        rows.append(PublishedRow(id=r["id"], source=data["sources"][r["source"]], model=m, gpus=gpus, workload=w,
                                 layout=lay, tok_s_gpu=float(r["tok_s_gpu"]), tflops_gpu=float(r["tflops_gpu"]),
                                 split=r["split"]))
    return rows


def measurement(row: PublishedRow) -> Measurement:
    """The published tokens/s/GPU as a step time (what calibrate.fit compares)."""
    return Measurement(row.workload, row.layout, row.workload.tokens_per_step / (row.tok_s_gpu * row.gpus), row.id)


def fit_knobs(cluster: ClusterConfig | None = None, rows: list[PublishedRow] | None = None) -> ClusterConfig:
    """Fit FIT_KNOBS on the "fit" rows only (held-out rows never enter)."""
    rows = load_rows() if rows is None else rows
    return fit(cluster or default_cluster(), [measurement(r) for r in rows if r.split == "fit"],
               knobs=FIT_KNOBS).cluster


@dataclass(frozen=True)
class RowResult:
    row: PublishedRow
    predicted_tok_s_gpu: float
    predicted_tflops_gpu: float
    memory_gib: float
    fits: bool

    @property
    def error(self) -> float:
        return self.predicted_tok_s_gpu / self.row.tok_s_gpu - 1.0


def evaluate(cluster: ClusterConfig | None = None, rows: list[PublishedRow] | None = None) -> list[RowResult]:
    cluster = cluster or default_cluster()
    out = []
    for r in load_rows() if rows is None else rows:
        st = step_time(r.workload, r.layout, cluster)
        mem = peak_memory(r.workload, r.layout, cluster)
        out.append(RowResult(r, st.tokens_per_sec_per_gpu, st.tflops_per_gpu, mem.total_bytes / GIB,
                             fits(mem, cluster)))
    return out


def rms(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0


def table(results: list[RowResult]) -> str:
    lines = ["| row | split | GPUs | TP·PP·CP·VP | MBS/GBS | seq | FSDP | published tok/s/GPU | predicted | error | "
             "published TFLOP/s | predicted TFLOP/s | memory GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in results:
        r, lay = x.row, x.row.layout
        lines.append(f"| {r.id} | {r.split} | {r.gpus} | {lay.tp}·{lay.pp}·{lay.cp}·{lay.vpp or 1} | "
                     f"{lay.micro_batch_size}/{r.workload.global_batch_size} | {r.workload.seq_length} | "
                     f"{int(lay.use_megatron_fsdp)} | {r.tok_s_gpu:,.0f} | {x.predicted_tok_s_gpu:,.0f} | "
                     f"{100 * x.error:+.1f}% | {r.tflops_gpu:.0f} | {x.predicted_tflops_gpu:.0f} | "
                     f"{x.memory_gib:.1f}{'' if x.fits else ' (NO FIT)'} |")
    return "\n".join(lines)


def summary(results: list[RowResult]) -> dict[str, float]:
    held = [x.error for x in results if x.row.split == "holdout"]
    fitted = [x.error for x in results if x.row.split == "fit"]
    return {"rms_holdout": rms(held), "rms_fit": rms(fitted), "max_abs_holdout": max(map(abs, held), default=0.0),
            "n_holdout": len(held), "n_fit": len(fitted), "all_fit_in_memory": all(x.fits for x in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refit", action="store_true", help="refit the knobs on the fit rows before predicting")
    a = p.parse_args(argv)
    cluster = default_cluster()
    if a.refit:
        cluster = fit_knobs(cluster)
        print("fitted: " + ", ".join(f"{k}={getattr(cluster.perf, k):.4g}" for k in FIT_KNOBS))
    res = evaluate(cluster)
    print(table(res))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary(res).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DATA", "FIT_KNOBS", "PublishedRow", "RowResult", "load_rows", "measurement", "fit_knobs", "evaluate",
           "rms", "table", "summary"]
