"""End to end on CPU: a 2-layout hcx-tiny sweep runs the real driver under torchrun, and the report
produces the results table (markdown + CSV) and the three PNG plots."""

import csv
import math
import statistics
from pathlib import Path

import pytest

from hcx_megatron.perf import study_cli
from hcx_megatron.perf.results import read_metrics_jsonl

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_two_layout_cpu_sweep_end_to_end(tmp_path, capsys):
    d = tmp_path / "cpu_sweep"
    assert study_cli.main([
        "generate", "--out", str(d), "--model-preset", "hcx-tiny", "--seq-length", "128", "--global-batch-size", "8",
        "--layout", "tp=1,dp=1,mb=2", "--layout", "tp=2,dp=1,mb=2", "--scaling", "layout",
        "--device", "cpu", "--no-bf16", "--train-iters", "6",
        "--cluster", str(REPO / "examples" / "clusters" / "cpu_local.yaml")]) == 0
    assert study_cli.main(["run-local", str(d), "--timeout", "280"]) == 0, capsys.readouterr()
    assert study_cli.main(["report", str(d), "--calibrate", "--fit", "matmul_efficiency"]) == 0
    rows = {r["label"]: r for r in csv.DictReader(open(d / "results.csv"))}
    assert set(rows) == {"layout-g1-tp1_pp1_dp1_mb2", "layout-g2-tp2_pp1_dp1_mb2_sp"}
    for label, r in rows.items():
        assert r["status"] == "ok" and int(r["iterations"]) == 4  # 6 steps, 2 warm-up dropped
        recs = [x for x in read_metrics_jsonl(d / "runs" / label / "metrics.jsonl") if x["kind"] == "train"]
        assert [x["iteration"] for x in recs] == list(range(1, 7))
        used = recs[2:]
        assert float(r["measured_step_s"]) == pytest.approx(statistics.median(x["step_time_s"] for x in used))
        # the driver's MFU (causal attention counted half, its --peak-tflops is the sweep cluster's) and ours
        # use one FLOP convention
        assert float(r["measured_mfu"]) == pytest.approx(statistics.median(x["mfu"] for x in used),
                                                         rel=0.02)
        assert math.isfinite(float(r["final_lm_loss"])) and float(r["predicted_step_s"]) > 0
    md = (d / "results.md").read_text()
    assert "Calibrated matmul_efficiency=" in md and md.count("| layout-g") == 2
    for name in ("tokens_per_gpu_vs_gpus.png", "mfu_vs_gpus.png", "predicted_vs_measured.png"):
        data = (d / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
