"""tools/scaling_study.py: generate a sweep, run it (Slurm array or local torchrun on CPU), report.

    generate  --out DIR (--layout SPEC ... | --gpu-counts N ... --scaling strong|weak) ...
    run-local DIR                       torchrun each layout on this machine (CPU)
    report    DIR [--calibrate]         results.md, results.csv, PNG plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcx_megatron.perf.calibrate import BOUNDS
from hcx_megatron.perf.cluster import load_cluster, save_cluster
from hcx_megatron.perf.layout import parse_layout
from hcx_megatron.perf.planner import SearchSpace
from hcx_megatron.perf.sweep import (Sweep, SweepRun, calibrate_sweep, collect, load_sweep, markdown_table,
                                     planned_runs, result_rows, run_local, write_csv, write_sweep)


def _data_args(a: argparse.Namespace) -> list[str]:
    if not a.data_path:
        return []
    if not a.tokenizer_model:
        raise ValueError("--data-path needs --tokenizer-model (the tokenizer the data was preprocessed with)")
    return ["--data-path", *a.data_path, "--tokenizer-model", a.tokenizer_model]


def _generate(a: argparse.Namespace) -> int:
    cluster = load_cluster(a.cluster)
    sweep = Sweep(name=a.name or Path(a.out).name, model_preset=a.model_preset, model_config=a.model_config,
                  seq_length=a.seq_length, cluster=cluster, runs=[], bf16=not a.no_bf16, train_iters=a.train_iters,
                  device=a.device, extra_args=a.extra_args or [], data_args=_data_args(a),
                  fp8_recipe=a.fp8_recipe if a.precision == "fp8" else None)
    if a.precision == "fp8" and a.no_bf16:
        raise ValueError("--precision fp8 runs bf16 mixed precision with FP8 linear layers; drop --no-bf16")
    model = sweep.model()
    runs: list[SweepRun] = []
    for spec in a.layout or []:
        lay = parse_layout(spec)
        problems = lay.check(sweep.workload(SweepRun("x", lay, a.global_batch_size)))
        if problems:
            raise ValueError(f"--layout {spec!r}: {'; '.join(problems)}")
        runs.append(SweepRun(label=f"{a.scaling}-g{lay.world_size}-{lay.label()}", layout=lay,
                             global_batch_size=a.global_batch_size, scaling=a.scaling))
    if a.gpu_counts:
        space = SearchSpace(micro_batch_sizes=tuple(a.micro_batch_sizes))
        for mode in (["strong", "weak"] if a.scaling == "both" else [a.scaling]):
            runs += planned_runs(model, a.seq_length, cluster, a.gpu_counts, mode, a.global_batch_size,
                                 per_count=a.per_count, space=space)
    if not runs:
        raise ValueError("give --layout SPEC (repeatable) and/or --gpu-counts N [N ...]")
    sweep.runs = runs
    d = write_sweep(sweep, a.out)
    print(f"wrote {d}/sweep.json, tasks.tsv and submit.sh with {len(runs)} runs:")
    for r in runs:
        print(f"  {r.label}  ({r.gpus} GPUs, global batch {r.global_batch_size})")
    print(f"submit on the cluster:  bash {d}/submit.sh      run here on CPU:  tools/scaling_study.py run-local {d}")
    return 0


def _run_local(a: argparse.Namespace) -> int:
    codes = run_local(a.sweep_dir, timeout_s=a.timeout, only=a.only)
    failed = {k: v for k, v in codes.items() if v != 0}
    for k, v in failed.items():
        print(f"run {k} failed with exit code {v}; see {a.sweep_dir}/runs/{k}/log.txt", file=sys.stderr)
    return 1 if failed else 0


def _report(a: argparse.Namespace) -> int:
    # matplotlib only for the report: generate / run-local work on login nodes without it
    from hcx_megatron.perf.plots import predicted_vs_measured_plot, scaling_plot

    d = Path(a.sweep_dir)
    sweep = load_sweep(d)
    if a.cluster:
        sweep.cluster = load_cluster(a.cluster)
    results = collect(sweep, d, skip=a.skip)
    lines = [f"# Scaling sweep `{sweep.name}`", "",
             f"Model `{sweep.model_preset}`, sequence length {sweep.seq_length}, cluster `{sweep.cluster.name}` "
             f"(peak {sweep.cluster.peak_tflops} TFLOP/s per GPU), {sweep.train_iters} iterations per run, "
             f"first {a.skip} logged steps dropped, medians of the rest.", ""]
    fit_note = ""
    if a.calibrate:
        knobs = tuple(a.fit.split(",")) if a.fit else ("matmul_efficiency", "step_overhead_s")
        res = calibrate_sweep(sweep, results, knobs)
        save_cluster(res.cluster, d / "calibrated_cluster.yaml")
        fit_note = (f"Calibrated {', '.join(f'{k}={v:.4g}' for k, v in res.fitted.items())}: RMS step-time error "
                    f"{100 * res.rms_rel_error_before:.1f}% -> {100 * res.rms_rel_error_after:.1f}% "
                    f"(written to calibrated_cluster.yaml).")
        print(fit_note)
        sweep.cluster = res.cluster
        results = collect(sweep, d, skip=a.skip)
    rows = result_rows(results)
    write_csv(rows, d / "results.csv")
    lines += [markdown_table(rows), ""]
    if fit_note:
        lines += ["Predictions use the calibrated cluster. " + fit_note, ""]
    missing = [r for r in rows if r["status"] != "ok"]
    if missing:
        lines += ["Runs without metrics:", ""] + [f"- `{r['label']}`: {r['status']}" for r in missing] + [""]
    title = f"{sweep.model_preset}, s={sweep.seq_length} on {sweep.cluster.name}"
    pngs = [scaling_plot(results, "tokens", d / "tokens_per_gpu_vs_gpus.png", f"Throughput per GPU — {title}"),
            scaling_plot(results, "mfu", d / "mfu_vs_gpus.png", f"MFU — {title}"),
            predicted_vs_measured_plot(results, d / "predicted_vs_measured.png", f"Step time — {title}")]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    (d / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(markdown_table(rows))
    print(f"wrote {d}/results.md, results.csv and {', '.join(p.name for p in pngs)}")
    return 0 if not missing or a.allow_missing else 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a sweep directory (spec, Slurm array tasks, submit script)")
    g.add_argument("--out", required=True)
    g.add_argument("--name", default=None)
    g.add_argument("--model-preset", default="hcx-tiny")
    g.add_argument("--model-config", default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--global-batch-size", type=int, default=8,
                   help="global batch (strong scaling), or the one at the smallest GPU count (weak scaling)")
    g.add_argument("--layout", action="append", help="e.g. tp=2,pp=1,dp=2,mb=1 (repeatable)")
    g.add_argument("--gpu-counts", type=int, nargs="*", help="let the planner pick the best layout at each count")
    g.add_argument("--scaling", choices=["strong", "weak", "both", "layout"], default="strong")
    g.add_argument("--per-count", type=int, default=1, help="planner layouts per GPU count")
    g.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    g.add_argument("--cluster", default=None, help="cluster YAML (default: DGX H100)")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    g.add_argument("--no-bf16", action="store_true", help="fp32 runs (CPU)")
    g.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                   help="fp8: the driver's --fp8-format hybrid (Transformer Engine, GPU)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise"], default="delayed")
    g.add_argument("--data-path", nargs="+", default=None, help="Megatron blend for real data (default: --mock-data)")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--extra-args", nargs=argparse.REMAINDER, help="passed to the driver verbatim (put last)")
    g.set_defaults(fn=_generate)
    r = sub.add_parser("run-local", help="run the sweep here with torchrun (CPU)")
    r.add_argument("sweep_dir")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    r.add_argument("--only", nargs="*", default=None, help="run labels to run (default: all)")
    r.set_defaults(fn=_run_local)
    q = sub.add_parser("report", help="collect metrics JSONL, write results.md/.csv and PNG plots")
    q.add_argument("sweep_dir")
    q.add_argument("--cluster", default=None, help="predict with this cluster YAML instead of the sweep's")
    q.add_argument("--calibrate", action="store_true", help="fit the model's knobs to the measured runs first")
    q.add_argument("--fit", default=None, help=f"comma-separated knobs to fit, from {sorted(BOUNDS)}")
    q.add_argument("--skip", type=int, default=2, help="leading train steps to drop (warm-up)")
    q.add_argument("--allow-missing", action="store_true", help="exit 0 even if some runs have no metrics")
    q.set_defaults(fn=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
