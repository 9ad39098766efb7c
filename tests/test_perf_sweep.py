"""Planner, plan CLI and sweep runner: generation (Slurm array), collection, calibration, report, plots.

The sweep report is exercised on synthetic metrics JSONL written from a known "true" cluster (so the
calibration has something definite to recover); test_perf_cpu_sweep.py runs a real CPU sweep.
"""

import csv
import json
import random
import shlex
import subprocess
from pathlib import Path

import pytest

from hcx_megatron.config.args import build_parser, config_from_args, validate_config
from hcx_megatron.config.model import get_preset
from hcx_megatron.perf import plan_cli, study_cli
from hcx_megatron.perf.cluster import default_cluster, load_cluster
from hcx_megatron.perf.layout import Layout, Workload, parse_layout
from hcx_megatron.perf.memory import GIB
from hcx_megatron.perf.planner import SearchSpace, plan
from hcx_megatron.perf.results import read_metrics_jsonl, summarize
from hcx_megatron.perf.sweep import load_sweep
from hcx_megatron.perf.timing import step_time

REPO = Path(__file__).resolve().parents[1]


def _driver_accepts(flags: list[str], world_size: int) -> None:
    a = build_parser().parse_args(flags)
    validate_config(config_from_args(a, world_size=world_size))


@pytest.mark.timeout(60)
def test_planner_ranks_fitting_layouts_the_driver_accepts():
    c = default_cluster()
    w = Workload(model=get_preset("hcx-s"), seq_length=4096, global_batch_size=256)
    entries, n = plan(w, 16, c)
    assert n > len(entries) > 10  # some were dropped for memory
    rates = [e.time.tokens_per_sec_per_gpu for e in entries]
    assert rates == sorted(rates, reverse=True)
    assert all(e.fits and e.memory.total_bytes <= c.usable_memory_fraction * c.hbm_gib * GIB for e in entries)
    for e in entries[:25]:
        assert e.layout.world_size == 16
        _driver_accepts(["--model-preset", "hcx-s", "--seq-length", "4096", "--global-batch-size", "256",
                         "--mock-data", "--device", "cuda", "--bf16"] + e.layout.megatron_flags(), 16)
    # a 70B-class model cannot train on one 8-GPU node (>= 18 bytes/param of state alone over 8 GPUs)
    big, _ = plan(Workload(model=get_preset("hcx-l"), seq_length=4096, global_batch_size=64), 8, c)
    assert big == []
    # long context offers context parallelism and picks it when it pays
    lc, _ = plan(Workload(model=get_preset("hcx-l"), seq_length=32768, global_batch_size=64), 256, c,
                 SearchSpace(micro_batch_sizes=(1,)))
    assert lc and lc[0].layout.cp > 1


@pytest.mark.timeout(60)
def test_plan_cli_table_single_layout_and_errors(capsys, tmp_path):
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--global-batch-size", "256", "--top", "5",
                          "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "layouts considered" in out and "tok/s/GPU" in out and "best: --tensor-model-parallel-size" in out
    assert len(json.loads((tmp_path / "plan.json").read_text())) > 5
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--global-batch-size", "256",
                          "--layout", "tp=2,dp=8,mb=1"]) == 0
    out = capsys.readouterr().out
    assert "memory GiB" in out and "bubble_s" in out
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--layout", "tp=3,dp=5"]) == 2
    assert "tp=3" in capsys.readouterr().err
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--cluster", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("peak_tflops: 100\nwarp_drive: 1\n")
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--cluster", str(bad)]) == 2
    assert "warp_drive" in capsys.readouterr().err


@pytest.mark.timeout(10)
def test_parse_layout_and_flags():
    lay = parse_layout("tp=4,pp=2,vpp=3,dp=2,mb=2,rc=full")
    assert lay == Layout(tp=4, pp=2, vpp=3, dp=2, micro_batch_size=2, sequence_parallel=True,
                         recompute_granularity="full", recompute_method="uniform")
    f = lay.megatron_flags()
    assert f[f.index("--virtual-pipeline-model-parallel-size") + 1] == "3" and "--sequence-parallel" in f
    with pytest.raises(ValueError, match="unknown key"):
        parse_layout("tp=2,zz=1")
    with pytest.raises(ValueError, match="integer"):
        parse_layout("tp=two")


@pytest.mark.timeout(10)
def test_metrics_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"kind":"train","iteration":1,"step_time_s":1.0}\n{not json}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_metrics_jsonl(p)
    p.write_text('{"kind":"train","iteration":1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: train record lacks \['step_time_s'\]"):
        read_metrics_jsonl(p)
    # warm-up steps dropped, median kept, resumed iterations de-duplicated (last attempt wins)
    recs = [{"kind": "train", "iteration": i, "step_time_s": t, "lm_loss": 1.0}
            for i, t in [(1, 9.0), (2, 5.0), (3, 1.0), (4, 3.0), (5, 2.0), (4, 1.5)]]
    s = summarize(recs + [{"kind": "event", "event": "save", "iteration": 5}], skip=2)
    assert s.iterations == 3 and s.step_time_s == 1.5


def _write_synthetic_metrics(sweep_dir: Path, truth, rng: random.Random, iters: int = 6) -> None:
    sw = load_sweep(sweep_dir)
    for run in sw.runs:
        w = sw.workload(run)
        t = step_time(w, run.layout, truth)
        path = sweep_dir / "runs" / run.label / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for i in range(1, iters + 1):
                st = t.total_s * (3.0 if i == 1 else 1.0 + rng.uniform(-0.01, 0.01))  # slow first step
                tok = w.tokens_per_step / st
                f.write(json.dumps({"kind": "train", "iteration": i, "lm_loss": 10.0 - i * 0.1, "lr": 1e-4,
                                    "grad_norm": 1.0, "step_time_s": st, "tokens_per_sec": tok,
                                    "tokens_per_sec_per_gpu": tok / run.gpus, "tflops_per_gpu": 0.0, "mfu": 0.0,
                                    "consumed_samples": i * run.global_batch_size,
                                    "seq_length": sw.seq_length, "mem_gb": 40.0}) + "\n")
            f.write(json.dumps({"kind": "eval", "iteration": iters, "lm_loss": 9.0}) + "\n")


@pytest.mark.timeout(120)
def test_sweep_generate_report_calibrate_on_synthetic_metrics(tmp_path, capsys):
    d = tmp_path / "sweep"
    assert study_cli.main(["generate", "--out", str(d), "--model-preset", "hcx-s", "--seq-length", "4096",
                           "--global-batch-size", "128", "--gpu-counts", "8", "16", "32", "--scaling", "both",
                           "--micro-batch-sizes", "1", "2", "--train-iters", "6"]) == 0
    sw = load_sweep(d)
    assert {(r.scaling, r.gpus) for r in sw.runs} == {(s, g) for s in ("strong", "weak") for g in (8, 16, 32)}
    assert {r.global_batch_size for r in sw.runs if r.scaling == "weak"} == {128, 256, 512}
    # tasks.tsv: one line per array index with flags the driver validates for that world size
    lines = (d / "tasks.tsv").read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        idx, label, nodes, per_node, flags = line.split("\t")
        run = next(r for r in sw.runs if r.label == label)
        assert int(nodes) * int(per_node) == run.gpus and int(per_node) == 8
        _driver_accepts(shlex.split(flags), run.gpus)
    submit = (d / "submit.sh").read_text()
    assert submit.count("sbatch ") == 3 and "--nodes=4 --ntasks-per-node=8" in submit
    assert str(REPO / "slurm" / "scaling_sweep.sh") in submit

    truth = default_cluster().with_perf(matmul_efficiency=0.45, step_overhead_s=0.2)
    _write_synthetic_metrics(d, truth, random.Random(0))
    capsys.readouterr()
    assert study_cli.main(["report", str(d), "--calibrate", "--fit", "matmul_efficiency,step_overhead_s"]) == 0
    out = capsys.readouterr().out
    assert "Calibrated matmul_efficiency=" in out
    fitted = load_cluster(d / "calibrated_cluster.yaml")
    assert fitted.perf.matmul_efficiency == pytest.approx(0.45, rel=0.03)
    rows = list(csv.DictReader(open(d / "results.csv")))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert abs(float(r["step_error_pct"])) < 3.0  # 1 % noise; first (slow) step dropped
        assert float(r["measured_mfu"]) == pytest.approx(float(r["predicted_mfu"]), rel=0.03)
    # hcx-plan-layout can fit the same knobs straight from the sweep directory
    assert plan_cli.main(["--model-preset", "hcx-s", "--num-gpus", "16", "--global-batch-size", "256", "--top", "3",
                          "--calibrate", str(d), "--fit", "matmul_efficiency", "--save-cluster",
                          str(tmp_path / "fitted.yaml")]) == 0
    assert "calibrated on 6 run(s): matmul_efficiency=0.4" in capsys.readouterr().out
    md = (d / "results.md").read_text()
    assert "| run | GPUs |" in md and "![tokens_per_gpu_vs_gpus](tokens_per_gpu_vs_gpus.png)" in md
    for name in ("tokens_per_gpu_vs_gpus.png", "mfu_vs_gpus.png", "predicted_vs_measured.png"):
        data = (d / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.timeout(60)
def test_report_flags_missing_runs(tmp_path, capsys):
    d = tmp_path / "sweep"
    study_cli.main(["generate", "--out", str(d), "--model-preset", "hcx-tiny", "--seq-length", "128",
                    "--global-batch-size", "8", "--layout", "tp=1,dp=1,mb=2", "--layout", "tp=2,dp=1,mb=2",
                    "--device", "cpu", "--no-bf16"])
    assert study_cli.main(["report", str(d)]) == 2
    rows = list(csv.DictReader(open(d / "results.csv")))
    assert all(r["status"].startswith("missing") for r in rows)
    assert study_cli.main(["report", str(d), "--allow-missing"]) == 0
    assert study_cli.main(["generate", "--out", str(tmp_path / "x"), "--layout", "tp=3"]) != 0
    # real data instead of mock: the blend and tokenizer reach the driver flags, which the driver accepts
    assert study_cli.main(["generate", "--out", str(tmp_path / "real"), "--model-preset", "hcx-tiny",
                           "--seq-length", "128", "--global-batch-size", "8", "--layout", "tp=1,dp=2,mb=2",
                           "--data-path", "0.7", "/d/ko", "0.3", "/d/en", "--tokenizer-model", "/d/tok"]) == 0
    flags = shlex.split((tmp_path / "real" / "tasks.tsv").read_text().split("\t")[4])
    assert "--mock-data" not in flags and flags[flags.index("--data-path") + 1: flags.index("--data-path") + 5] == [
        "0.7", "/d/ko", "0.3", "/d/en"]
    _driver_accepts(flags, 2)
    assert study_cli.main(["generate", "--out", str(tmp_path / "y"), "--layout", "tp=1", "--data-path", "/d/x"]) == 2


@pytest.mark.timeout(120)
def test_slurm_array_script_dry_run(tmp_path):
    d = tmp_path / "sweep"
    study_cli.main(["generate", "--out", str(d), "--model-preset", "hcx-tiny", "--seq-length", "128",
                    "--global-batch-size", "8", "--layout", "tp=1,dp=1,mb=2", "--layout", "tp=2,dp=1,mb=2",
                    "--device", "cpu", "--no-bf16"])
    env = {"PATH": "/usr/bin:/bin:" + str(Path(__import__("sys").executable).parent), "HCX_DRY_RUN": "1",
           "DEVICE": "cpu", "SLURM_ARRAY_TASK_ID": "1", "HCX_REPO": str(REPO), "HOME": str(tmp_path),
           "PYTHON": __import__("sys").executable}
    res = subprocess.run(["bash", str(REPO / "slurm" / "scaling_sweep.sh"), str(d)], env=env, capture_output=True,
                         text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    assert "strong-g2-tp2_pp1_dp1_mb2_sp on 1 node(s) x 2" in res.stdout
    assert "--tensor-model-parallel-size 2" in res.stdout and "TP2" in res.stdout
    env["SLURM_ARRAY_TASK_ID"] = "7"
    res = subprocess.run(["bash", str(REPO / "slurm" / "scaling_sweep.sh"), str(d)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "no task 7" in res.stderr
