"""Published NVIDIA H100 pre-training results (published_h100.yaml) against the model's predictions.

    python -m hcx_megatron.perf.published            # per-row table, RMS on fit and held-out rows
    python -m hcx_megatron.perf.published --refit    # refit the knobs on the "fit" rows only, then the table
    python -m hcx_megatron.perf.published --planner  # also rank each published recipe's layout in the planner

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
from hcx_megatron.perf.planner import PlanEntry, SearchSpace, plan
from hcx_megatron.perf.timing import step_time

DATA = Path(__file__).with_name("published_h100.yaml")
# the knobs fitted on the "fit" rows (their values are stored in examples/clusters/h100.yaml / ClusterConfig)
FIT_KNOBS = ("matmul_efficiency", "attention_efficiency", "fp8_speedup")


@dataclass(frozen=True)
class PublishedRow:
    id: str
    source: str  # URL
    model: ModelConfig
    gpus: int
    workload: Workload
    layout: Layout
    tok_s_gpu: float
    tflops_gpu: float | None  # None where the table publishes no model TFLOP/s (DGX Cloud: MFU only)
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
                     account_for_embedding_in_pipeline_split=uneven, account_for_loss_in_pipeline_split=uneven,
                     **(r.get("extra") or {}))
        if r["split"] not in ("fit", "holdout"):
            raise ValueError(f"{path}: row {r['id']}: split must be fit or holdout, got {r['split']!r}")
        # per-GPU tables publish tok_s_gpu; the DGX Cloud tables publish the whole job's tokens/s (tok_s)
        tok_s_gpu = float(r["tok_s_gpu"]) if "tok_s_gpu" in r else float(r["tok_s"]) / gpus
        rows.append(PublishedRow(id=r["id"], source=data["sources"][r["source"]], model=m, gpus=gpus, workload=w,
                                 layout=lay, tok_s_gpu=tok_s_gpu,
                                 tflops_gpu=float(r["tflops_gpu"]) if "tflops_gpu" in r else None,
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
    lines = ["| row | precision | split | GPUs | TP·PP·CP·VP | MBS/GBS | seq | FSDP | published tok/s/GPU | "
             "predicted | error | published TFLOP/s | predicted TFLOP/s | memory GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in results:
        r, lay = x.row, x.row.layout
        rc = f" rc-{lay.recompute_granularity[:3]}" if lay.recompute_granularity else ""
        published_tflops = "–" if r.tflops_gpu is None else f"{r.tflops_gpu:.0f}"
        lines.append(f"| {r.id} | {r.workload.precision} | {r.split} | {r.gpus} | "
                     f"{lay.tp}·{lay.pp}·{lay.cp}·{lay.vpp or 1}{rc} | "
                     f"{lay.micro_batch_size}/{r.workload.global_batch_size} | {r.workload.seq_length} | "
                     f"{int(lay.use_megatron_fsdp)} | {r.tok_s_gpu:,.0f} | {x.predicted_tok_s_gpu:,.0f} | "
                     f"{100 * x.error:+.1f}% | {published_tflops} | {x.predicted_tflops_gpu:.0f} | "
                     f"{x.memory_gib:.1f}{'' if x.fits else ' (NO FIT)'} |")
    return "\n".join(lines)


def summary(results: list[RowResult]) -> dict[str, float]:
    """RMS of the tokens/s/GPU error on held-out and fit rows, all precisions and each one."""
    out: dict[str, float] = {}
    for tag, keep in (("", lambda x: True), ("_fp8", lambda x: x.row.workload.fp8),
                      ("_bf16", lambda x: x.row.workload.precision == "bf16")):
        held = [x.error for x in results if keep(x) and x.row.split == "holdout"]
        fitted = [x.error for x in results if keep(x) and x.row.split == "fit"]
        out.update({f"rms_holdout{tag}": rms(held), f"rms_fit{tag}": rms(fitted),
                    f"max_abs_holdout{tag}": max(map(abs, held), default=0.0), f"n_holdout{tag}": len(held),
                    f"n_fit{tag}": len(fitted)})
    out["all_fit_in_memory"] = all(x.fits for x in results)
    return out


@dataclass(frozen=True)
class PlannerCheck:
    row: PublishedRow
    published_tok_s_gpu: float  # the model's prediction for the published layout
    best: PlanEntry  # the planner's top layout
    rank: int  # 1 + fitting layouts the planner predicts faster than the published one
    considered: int
    fitting: int

    @property
    def gap(self) -> float:
        """Published layout's predicted tokens/s/GPU relative to the planner's best (0 = it is the best)."""
        return self.published_tok_s_gpu / self.best.time.tokens_per_sec_per_gpu - 1.0


PLANNER_CHECK_MAX_VPP = 24  # wide enough for every published VP (up to 20); the planner's default stops at 8


def recipes(rows: list[PublishedRow]) -> list[PublishedRow]:
    """One row per published recipe (model, precision, source): its first (smallest) GPU count."""
    seen, out = set(), []
    for r in rows:
        key = (r.model.name, r.workload.precision, r.source)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def planner_check(row: PublishedRow, cluster: ClusterConfig | None = None) -> PlannerCheck:
    """Rank the published layout among the planner's layouts for the same workload and GPU count.

    The planner searches with the recipe's own switches (TP overlap, bf16 gradient reduce, the optimizer's
    memory format, FP8 weights, FSDP when the recipe uses it) so that layouts are compared, not settings."""
    cluster = cluster or default_cluster()
    lay = row.layout
    space = SearchSpace(max_vpp=PLANNER_CHECK_MAX_VPP,
                        layout_switches=(("tp_comm_overlap", True), ("grad_reduce_in_fp32", False),
                                         ("optimizer_param_remainders", lay.optimizer_param_remainders),
                                         ("fp8_param_gather", lay.fp8_param_gather)),
                        megatron_fsdp=(False, True) if lay.use_megatron_fsdp else (False,))
    entries, considered = plan(row.workload, row.gpus, cluster, space)
    published = step_time(row.workload, lay, cluster).tokens_per_sec_per_gpu
    rank = 1 + sum(e.time.tokens_per_sec_per_gpu > published for e in entries)
    return PlannerCheck(row, published, entries[0], rank, considered, len(entries))


def planner_table(checks: list[PlannerCheck]) -> str:
    lines = ["| recipe | precision | GPUs | published layout | predicted tok/s/GPU | planner best | best tok/s/GPU | "
             "gap | rank / fitting |", "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        r = c.row
        lines.append(f"| {r.id} | {r.workload.precision} | {r.gpus} | {r.layout.label()} | "
                     f"{c.published_tok_s_gpu:,.0f} | {c.best.layout.label()} | "
                     f"{c.best.time.tokens_per_sec_per_gpu:,.0f} | {100 * c.gap:+.1f}% | {c.rank} / {c.fitting} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refit", action="store_true", help="refit the knobs on the fit rows before predicting")
    p.add_argument("--planner", action="store_true",
                   help="also rank each published recipe's layout among the planner's (slow: minutes)")
    a = p.parse_args(argv)
    cluster = default_cluster()
    if a.refit:
        cluster = fit_knobs(cluster)
        print("fitted: " + ", ".join(f"{k}={getattr(cluster.perf, k):.4g}" for k in FIT_KNOBS))
    res = evaluate(cluster)
    print(table(res))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary(res).items()})
    if a.planner:
        print(planner_table([planner_check(r, cluster) for r in recipes(load_rows())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DATA", "FIT_KNOBS", "PublishedRow", "RowResult", "load_rows", "measurement", "fit_knobs", "evaluate",
           "rms", "table", "summary", "PlannerCheck", "PLANNER_CHECK_MAX_VPP", "recipes", "planner_check",
           "planner_table"]
