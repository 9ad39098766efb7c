"""The hang watchdog's parts without a cluster: per-rank heartbeat files (hcx_megatron/training/heartbeat.py)
and the verdicts of launch/watchdog.py. The real thing (a SIGSTOPped rank on a 2-node Slurm job) is
tests/test_slurm_multinode.py::test_stopped_rank_is_named_and_the_job_fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hcx_megatron.training.heartbeat import Heartbeat, heartbeat_path
from launch.watchdog import judge, main as watchdog_main, read_heartbeats


def rec(rank, host, alive, progress, iteration, job="7", step="0"):
    return {"rank": rank, "host": host, "pid": 100 + rank, "job": job, "step": step, "iteration": iteration,
            "alive": alive, "progress": progress}


def test_heartbeat_thread_keeps_alive_fresh_and_beat_records_progress(tmp_path):
    hb = Heartbeat(str(tmp_path), rank=3, interval_s=0.05)
    first = json.loads(open(heartbeat_path(str(tmp_path), 3)).read())
    assert first["rank"] == 3 and first["iteration"] is None and first["progress"] is None
    hb.beat(5)
    time.sleep(0.3)  # the thread writes the beat with its next `alive`
    after_beat = read_heartbeats(str(tmp_path))[3]
    assert after_beat["iteration"] == 5 and after_beat["progress"] >= first["alive"]
    time.sleep(0.3)
    later = read_heartbeats(str(tmp_path))[3]
    assert later["alive"] > after_beat["alive"]  # written without any new beat
    assert later["progress"] == after_beat["progress"] and later["iteration"] == 5


def test_verdicts():
    now = 1000.0
    healthy = {r: rec(r, f"node{r // 2 + 1}", now - 1, now - 2, 9) for r in range(4)}
    assert judge(healthy, now, 30, 4) is None
    assert judge({}, now, 30, 4) is None

    stopped = dict(healthy)
    stopped[3] = rec(3, "node2", now - 45, now - 50, 8)
    v = judge(stopped, now, 30, 4)
    assert v is not None and (v.job, v.step) == ("7", "0")
    assert "rank 3 on node2 (pid 103, last iteration 8) silent for 45 s" in v.message
    assert "process is stopped or its node is gone" in v.message and "rank 2" not in v.message

    # Everyone alive, nobody finished a step: a hang inside a collective, the ranks furthest behind named.
    stuck = {r: rec(r, f"node{r // 2 + 1}", now - 1, now - 40, 9 if r != 1 else 8) for r in range(4)}
    v = judge(stuck, now, 30, 4)
    assert v is not None and "all 4 ranks alive but none finished a step" in v.message
    assert "lowest iteration 8: rank 1 on node1" in v.message

    # Before every rank has reported, slow progress is not a verdict (start-up is the distributed timeout's).
    partial = {r: stuck[r] for r in (0, 1, 2)}
    assert judge(partial, now, 30, 4) is None


@pytest.mark.dist  # starts one `sleep` process to stand in for srun
def test_watchdog_kills_the_step_and_writes_its_report(tmp_path):
    step = subprocess.Popen(["sleep", "60"])
    try:
        beats = tmp_path / "hb"
        beats.mkdir()
        now = time.time()
        for r in range(2):
            # Not under Slurm (no job/step ids): the watchdog kills the step process itself.
            record = rec(r, "hostA", now - (100 if r == 1 else 0), now, 3, job=None, step=None)
            (beats / f"rank-{r:05d}.json").write_text(json.dumps(record))
        report = tmp_path / "hang.txt"
        code = watchdog_main(["--dir", str(beats), "--ranks", "2", "--timeout", "30", "--poll", "0.1",
                              "--step-pid", str(step.pid), "--report", str(report)])
        assert code == 3
        assert step.wait(timeout=10) == -9
        assert "rank 1 on hostA" in report.read_text()
        # With the step gone the watchdog exits quietly.
        assert watchdog_main(["--dir", str(beats), "--ranks", "2", "--timeout", "30",
                              "--step-pid", str(step.pid)]) == 0
    finally:
        if step.poll() is None:
            step.kill()


@pytest.mark.dist  # a fresh interpreter
def test_watchdog_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, launch.watchdog; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


GLOO_TIMEOUTS = r"""
import datetime, sys, torch
from megatron.core import parallel_state as ps
from hcx_megatron.config.args import parse_config
from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
cfg, _ = parse_config(["--model-preset", "hcx-tiny", "--mock-data", "--device", "cpu", "--global-batch-size", "1",
                       "--micro-batch-size", "1", "--seq-length", "32", "--train-iters", "1", "--lr", "1e-4",
                       "--distributed-timeout-minutes", "3"], world_size=1)
initialize_distributed(cfg)
groups = {"default": torch.distributed.distributed_c10d._get_default_group(),
          "tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
          "dp": ps.get_data_parallel_group()}
for name, g in groups.items():
    print(name, g._get_backend(torch.device("cpu")).options._timeout.total_seconds())
shutdown()
"""


@pytest.mark.dist  # a one-rank gloo world in a fresh interpreter
def test_distributed_timeout_flag_reaches_every_gloo_group(tmp_path):
    """--distributed-timeout-minutes bounds how long survivors of a lost node wait in a collective: the
    default group and megatron-core's groups all carry it."""
    import os

    from conftest import REPO
    from torchrun_utils import free_port

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", GLOO_TIMEOUTS], capture_output=True, text=True, timeout=240,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(line.split() for line in proc.stdout.splitlines() if line.split()[0] in ("default", "tp", "pp", "dp"))
    assert seen == {"default": "180.0", "tp": "180.0", "pp": "180.0", "dp": "180.0"}, proc.stdout
