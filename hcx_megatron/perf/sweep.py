"""Scaling sweeps: a set of layouts at one or more GPU counts, run as a Slurm job array or locally
with torchrun on CPU, then collected into a results table (markdown + CSV) against predictions.

A sweep directory holds
    sweep.json        the spec (model, sequence length, cluster, runs) — written by `generate`
    tasks.tsv         one line per array task: index, label, nodes, tasks per node, driver flags
    submit.sh         one `sbatch --array=...` per node count (a job array has one shape per job)
    runs/<label>/metrics.jsonl, runs/<label>/log.txt
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hcx_megatron.config.model import ModelConfig, get_preset, load_model_yaml
from hcx_megatron.perf.calibrate import FitResult, Measurement, fit
from hcx_megatron.perf.cluster import ClusterConfig, cluster_from_dict, save_cluster
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import peak_memory
from hcx_megatron.perf.planner import SearchSpace, plan
from hcx_megatron.perf.results import RunSummary, summarize_file
from hcx_megatron.perf.timing import step_time


@dataclass
class SweepRun:
    label: str
    layout: Layout
    global_batch_size: int
    scaling: str = "layout"  # "strong" | "weak" | "layout" (a hand-picked layout comparison)

    @property
    def gpus(self) -> int:
        return self.layout.world_size


@dataclass
class Sweep:
    name: str
    model_preset: str
    seq_length: int
    cluster: ClusterConfig
    runs: list[SweepRun]
    model_config: str | None = None  # optional YAML applied on top of the preset
    bf16: bool = True
    train_iters: int = 20
    device: str = "cuda"
    extra_args: list[str] = field(default_factory=list)
    data_args: list[str] = field(default_factory=list)  # e.g. --data-path ... --tokenizer-model ...; empty: mock
    fp8_recipe: str | None = None  # "delayed" | "tensorwise": bf16 runs with TE FP8 linear layers

    def model(self) -> ModelConfig:
        m = get_preset(self.model_preset)
        return load_model_yaml(self.model_config, base=m) if self.model_config else m

    def workload(self, run: SweepRun) -> Workload:
        return Workload(model=self.model(), seq_length=self.seq_length, global_batch_size=run.global_batch_size,
                        precision="fp8" if self.fp8_recipe else ("bf16" if self.bf16 else "fp32"),
                        fp8_recipe=self.fp8_recipe or "delayed")

    def driver_flags(self, run: SweepRun, run_dir: str) -> list[str]:
        f = ["--model-preset", self.model_preset]
        if self.model_config:
            f += ["--model-config", self.model_config]
        f += ["--seq-length", str(self.seq_length), "--global-batch-size", str(run.global_batch_size),
              "--train-iters", str(self.train_iters), "--log-interval", "1"]
        f += list(self.data_args) if self.data_args else ["--mock-data"]
        f += ["--device", self.device, "--peak-tflops", str(self.cluster.peak_tflops),
              "--metrics-jsonl", f"{run_dir}/metrics.jsonl"]
        if self.bf16:
            f.append("--bf16")
        if self.fp8_recipe:
            f += ["--fp8-format", "hybrid", "--fp8-recipe", self.fp8_recipe,
                  "--fp8-peak-tflops", str(self.cluster.fp8_peak_tflops)]
        return f + run.layout.megatron_flags() + list(self.extra_args)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["runs"] = [{"label": r.label, "layout": r.layout.to_dict(), "global_batch_size": r.global_batch_size,
                      "scaling": r.scaling} for r in self.runs]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "sweep.json") -> "Sweep":
        d = dict(d)
        try:
            runs = [SweepRun(label=r["label"], layout=Layout.from_dict(r["layout"], f"{source}: run {r['label']}"),
                             global_batch_size=int(r["global_batch_size"]), scaling=r.get("scaling", "layout"))
                    for r in d.pop("runs")]
            return cls(cluster=cluster_from_dict(d.pop("cluster"), source), runs=runs, **d)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed sweep spec ({exc})") from None


def load_sweep(sweep_dir: str | Path) -> Sweep:
    p = Path(sweep_dir) / "sweep.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not a sweep directory (run `tools/scaling_study.py generate` first)")
    with open(p, encoding="utf-8") as f:
        return Sweep.from_dict(json.load(f), str(p))


def planned_runs(model: ModelConfig, seq_length: int, cluster: ClusterConfig, gpu_counts: list[int],
                 scaling: str, global_batch_size: int, per_count: int = 1,
                 space: SearchSpace = SearchSpace()) -> list[SweepRun]:
    """The planner's best `per_count` layouts at each GPU count.

    strong: the global batch stays `global_batch_size`; weak: it grows with the GPU count
    (global_batch_size at the smallest count), so the work per GPU stays constant.
    """
    runs = []
    base = min(gpu_counts)
    for n in sorted(gpu_counts):
        gbs = global_batch_size if scaling == "strong" else global_batch_size * n // base
        w = Workload(model=model, seq_length=seq_length, global_batch_size=gbs)
        entries, _ = plan(w, n, cluster, space)
        if not entries:
            raise ValueError(f"no layout of {model.name} fits {n} GPUs with global batch {gbs}")
        for e in entries[:per_count]:
            runs.append(SweepRun(label=f"{scaling}-g{n}-{e.layout.label()}", layout=e.layout,
                                 global_batch_size=gbs, scaling=scaling))
    return runs


def write_sweep(sweep: Sweep, sweep_dir: str | Path, repo_root: str | Path | None = None) -> Path:
    """Write sweep.json, tasks.tsv and submit.sh into sweep_dir."""
    d = Path(sweep_dir)
    (d / "runs").mkdir(parents=True, exist_ok=True)
    labels = [r.label for r in sweep.runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate run labels in sweep: {sorted(x for x in labels if labels.count(x) > 1)}")
    with open(d / "sweep.json", "w", encoding="utf-8") as f:
        json.dump(sweep.to_dict(), f, indent=2)
    gpn = sweep.cluster.gpus_per_node
    by_nodes: dict[tuple[int, int], list[int]] = {}
    with open(d / "tasks.tsv", "w", encoding="utf-8") as f:
        for i, run in enumerate(sweep.runs):
            nodes = -(-run.gpus // gpn)
            per_node = min(run.gpus, gpn)
            if nodes * per_node != run.gpus:
                raise ValueError(f"run {run.label}: {run.gpus} GPUs do not fill whole {gpn}-GPU nodes")
            flags = shlex.join(sweep.driver_flags(run, f"{d.resolve()}/runs/{run.label}"))
            f.write(f"{i}\t{run.label}\t{nodes}\t{per_node}\t{flags}\n")
            by_nodes.setdefault((nodes, per_node), []).append(i)
    script = Path(repo_root or Path(__file__).resolve().parents[2]) / "slurm" / "scaling_sweep.sh"
    lines = ["#!/bin/bash", "# Generated by tools/scaling_study.py generate: one job array per node count.",
             "set -euo pipefail"]
    for (nodes, per_node), idx in sorted(by_nodes.items()):
        lines.append(f"sbatch --nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} "
                     f"--array={','.join(map(str, idx))} {shlex.quote(str(script))} {shlex.quote(str(d.resolve()))}")
    (d / "submit.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(d / "submit.sh", 0o755)
    return d


def run_local(sweep_dir: str | Path, timeout_s: float = 900.0, only: list[str] | None = None,
              python: str = sys.executable) -> dict[str, int]:
    """Run every task of the sweep on this machine with torchrun (CPU), one after another.

    Returns label -> exit code. Each run's console output goes to runs/<label>/log.txt.
    """
    d = Path(sweep_dir)
    sweep = load_sweep(d)
    codes = {}
    todo = [r for r in sweep.runs if not only or r.label in only]
    t_all = time.time()
    for k, run in enumerate(todo, 1):
        run_dir = d / "runs" / run.label
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()  # the driver appends; a rerun must not mix with an old attempt
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.gpus}",
               "-m", "hcx_megatron.pretrain"] + sweep.driver_flags(run, str(run_dir.resolve()))
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t0 = time.time()
        print(f"[{k}/{len(todo)}] {run.label}: {run.gpus} process(es)", flush=True)
        with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        codes[run.label] = rc
        print(f"[{k}/{len(todo)}] {run.label}: exit {rc} in {time.time() - t0:.1f}s "
              f"({time.time() - t_all:.0f}s total)", flush=True)
    return codes


@dataclass
class RunResult:
    run: SweepRun
    measured: RunSummary | None
    predicted_step_s: float
    predicted_tokens_per_sec_per_gpu: float
    predicted_mfu: float
    predicted_mem_gib: float
    measured_mfu: float | None
    measured_tokens_per_sec_per_gpu: float | None
    error: str | None = None


def collect(sweep: Sweep, sweep_dir: str | Path, cluster: ClusterConfig | None = None,
            skip: int = 2) -> list[RunResult]:
    """Each run's measured summary (None when missing/failed) next to the model's prediction."""
    cluster = cluster or sweep.cluster
    out = []
    for run in sweep.runs:
        w = sweep.workload(run)
        st = step_time(w, run.layout, cluster)
        mem = peak_memory(w, run.layout, cluster)
        summary, err = None, None
        path = Path(sweep_dir) / "runs" / run.label / "metrics.jsonl"
        try:
            summary = summarize_file(path, skip=skip)
        except (FileNotFoundError, ValueError) as exc:
            err = str(exc)
        mfu = tok = None
        if summary is not None:
            tok = summary.tokens_per_sec_per_gpu
            if tok is None:
                tok = w.tokens_per_step / summary.step_time_s / run.gpus
            # MFU with our FLOP count and the sweep's peak, so measured and predicted use one definition
            mfu = st.model_flops_per_token * tok / 1e12 / st.peak_tflops  # the FP8 peak for fp8 sweeps
        out.append(RunResult(run=run, measured=summary, predicted_step_s=st.total_s,
                             predicted_tokens_per_sec_per_gpu=st.tokens_per_sec_per_gpu, predicted_mfu=st.mfu,
                             predicted_mem_gib=mem.total_gib, measured_mfu=mfu, measured_tokens_per_sec_per_gpu=tok,
                             error=err))
    return out


def calibrate_sweep(sweep: Sweep, results: list[RunResult], knobs: tuple[str, ...]) -> FitResult:
    data = [Measurement(sweep.workload(r.run), r.run.layout, r.measured.step_time_s, r.run.label)
            for r in results if r.measured is not None]
    if not data:
        raise ValueError("--calibrate: no run has measured metrics yet")
    return fit(sweep.cluster, data, knobs=knobs)


CSV_COLUMNS = ("label", "scaling", "gpus", "tp", "pp", "vpp", "cp", "dp", "micro_batch_size", "global_batch_size",
               "recompute", "measured_step_s", "predicted_step_s", "step_error_pct",
               "measured_tokens_per_sec_per_gpu", "predicted_tokens_per_sec_per_gpu", "measured_mfu",
               "predicted_mfu", "measured_mem_gb", "predicted_mem_gib", "final_lm_loss", "iterations", "status")


def result_rows(results: list[RunResult]) -> list[dict]:
    rows = []
    for r in results:
        lay, m = r.run.layout, r.measured
        rows.append({
            "label": r.run.label, "scaling": r.run.scaling, "gpus": r.run.gpus, "tp": lay.tp, "pp": lay.pp,
            "vpp": lay.vpp or "", "cp": lay.cp, "dp": lay.dp, "micro_batch_size": lay.micro_batch_size,
            "global_batch_size": r.run.global_batch_size, "recompute": lay.recompute_granularity or "none",
            "measured_step_s": m.step_time_s if m else "", "predicted_step_s": r.predicted_step_s,
            "step_error_pct": 100 * (r.predicted_step_s / m.step_time_s - 1) if m else "",
            "measured_tokens_per_sec_per_gpu": r.measured_tokens_per_sec_per_gpu if m else "",
            "predicted_tokens_per_sec_per_gpu": r.predicted_tokens_per_sec_per_gpu,
            "measured_mfu": r.measured_mfu if m else "", "predicted_mfu": r.predicted_mfu,
            "measured_mem_gb": m.mem_gb if m and m.mem_gb is not None else "",
            "predicted_mem_gib": r.predicted_mem_gib,
            "final_lm_loss": m.final_lm_loss if m and m.final_lm_loss is not None else "",
            "iterations": m.iterations if m else 0, "status": "ok" if m else f"missing: {r.error}",
        })
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        wr.writeheader()
        wr.writerows(rows)


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else (str(v) if v != "" else "-")


def markdown_table(rows: list[dict]) -> str:
    cols = [("run", "label", "s"), ("GPUs", "gpus", "d"), ("TP", "tp", "d"), ("PP", "pp", "d"), ("VPP", "vpp", ""),
            ("CP", "cp", "d"), ("DP", "dp", "d"), ("MB", "micro_batch_size", "d"), ("GBS", "global_batch_size", "d"),
            ("step s meas", "measured_step_s", ".4f"), ("step s pred", "predicted_step_s", ".4f"),
            ("err %", "step_error_pct", "+.1f"), ("tok/s/GPU meas", "measured_tokens_per_sec_per_gpu", ",.0f"),
            ("tok/s/GPU pred", "predicted_tokens_per_sec_per_gpu", ",.0f"), ("MFU meas %", "measured_mfu", ".2%"),
            ("MFU pred %", "predicted_mfu", ".2%"), ("mem GB meas", "measured_mem_gb", ".2f"),
            ("mem GiB pred", "predicted_mem_gib", ".2f"), ("loss", "final_lm_loss", ".3f")]
    out = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [_fmt(r[k], spec) for _, k, spec in cols]
        cells = [c.replace("%", "") if spec.endswith("%") else c for c, (_, _, spec) in zip(cells, cols)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


__all__ = ["SweepRun", "Sweep", "load_sweep", "planned_runs", "write_sweep", "run_local", "RunResult", "collect",
           "calibrate_sweep", "result_rows", "write_csv", "markdown_table", "CSV_COLUMNS", "save_cluster"]
