"""launch/: argument handling, the dry-run layout report, Slurm-env start-up of real processes, and the
SIGUSR1 routing that keeps the driver's helper processes alive during a preemption save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import layout
from launch.run import split_argv
from launch.mpi import free_port

REPO = Path(__file__).resolve().parents[1]
HCX_L_ARGS = ["--model-preset", "hcx-l", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
              "--num-layers-per-virtual-pipeline-stage", "5", "--sequence-parallel", "--use-distributed-optimizer",
              "--global-batch-size", "1024", "--seq-length", "4096", "--mock-data", "--bf16"]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (pytest may itself run under Slurm/MPI)."""
    drop = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.mark.timeout(30)
def test_split_argv():
    assert split_argv(["--dry-run", "--", "m", "--x", "1"]) == (["--dry-run"], ["m", "--x", "1"])
    with pytest.raises(SystemExit, match="after `--`"):
        split_argv(["hcx_megatron.pretrain"])


@pytest.mark.timeout(60)
def test_rank_coordinates_follow_megatron_order():
    """tp fastest, then cp, dp, pp (megatron-core's default tp-cp-ep-dp-pp)."""
    lay = layout.parallel_layout_from_argv(
        ["--model-preset", "hcx-tiny", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
         "--global-batch-size", "8", "--mock-data", "--device", "cpu"], world_size=8)
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.num_microbatches) == (2, 2, 1, 2, 4)
    coords = layout.rank_coordinates(lay)
    for rank, c in enumerate(coords):
        assert rank == c["tp"] + 2 * (c["cp"] + 1 * (c["dp"] + 2 * c["pp"])), (rank, c)


@pytest.mark.timeout(30)
def test_job_hosts_from_slurm_env():
    env = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[1-3]",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2),4"}
    hosts = layout.job_hosts_from_env(env)
    assert hosts.hosts == ("gpu1", "gpu2", "gpu3") and hosts.world_size == 20
    assert hosts.host_of_rank(9) == ("gpu2", 1) and hosts.host_of_rank(19) == ("gpu3", 3)
    with pytest.raises(ValueError, match="outside world size"):
        hosts.host_of_rank(20)
    assert layout.job_hosts_from_env({}) is None


@pytest.mark.timeout(120)
def test_dry_run_plans_hcx_l_on_16_nodes():
    proc = subprocess.run([sys.executable, "-m", "launch.run", "--dry-run", "--nodes", "16", "--tasks-per-node", "8",
                           "--", "hcx_megatron.pretrain", *HCX_L_ARGS],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "16 node(s) x 8 task(s) = 128 ranks" in out
    assert "TP8 x PP4 VPP4 x CP1 x DP4 + SP + dist-opt on cuda" in out
    assert "micro 1 x 256 microbatches x DP4 = global 1024" in out
    # Each TP group fills one node (NVLink); four nodes (DP4) share each pipeline stage.
    assert "node001: ranks 0-7 | pp stage 0 | tp 0-7 | dp 0" in out
    assert "node016: ranks 120-127 | pp stage 3 | tp 0-7 | dp 3" in out


@pytest.mark.timeout(120)
def test_dry_run_rejects_layout_that_does_not_divide():
    """TP8 x PP4 = 32 does not divide 24 ranks: the driver's own check, exit 2, message names the flags."""
    proc = subprocess.run([sys.executable, "-m", "launch.run", "--dry-run", "--nodes", "3", "--tasks-per-node", "8",
                           "--", "hcx_megatron.pretrain", *HCX_L_ARGS],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "INVALID LAYOUT for 24 ranks" in proc.stdout
    assert "--tensor-model-parallel-size" in proc.stdout


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_processes_from_slurm_step_env(tmp_path):
    """Two real processes get exactly the variables srun gives its tasks; launch.run turns them into a
    gloo process group (rank/world/master from SLURM_*), checked by an all-reduce."""
    report = tmp_path / "selftest.jsonl"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _clean_env(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                         SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                         SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
                         SLURM_STEP_TASKS_PER_NODE="2", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.run", "--", "launch.selftest", "--report-jsonl", str(report)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=170)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "selftest rank 1/2 local 1" in outs[1] and f"master localhost:{port}" in outs[1]
    rec = json.loads(report.read_text().splitlines()[-1])
    assert rec["world_size"] == 2 and rec["allreduce"] == 1.0 and rec["ok"] is True


SIGNAL_PAYLOAD = textwrap.dedent("""
    import json, multiprocessing as mp, os, signal, sys, time
    from launch import signals as routing

    def child():
        time.sleep(4)

    if __name__ == "__main__":
        if sys.argv[1] == "route":
            routing.route_to_main_process()
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))  # what the driver installs
        p = mp.get_context("spawn").Process(target=child)           # what dist_checkpointing starts
        p.start()
        time.sleep(1.5)
        os.killpg(os.getpgrp(), signal.SIGUSR1)                      # what slurmstepd does to a step
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.05)
        p.join(20)
        print(json.dumps({"handled": bool(got), "child_exitcode": p.exitcode}))
""")


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["route", "plain"])
def test_sigusr1_reaches_driver_but_not_its_spawned_helpers(tmp_path, mode):
    script = tmp_path / "payload.py"
    script.write_text(SIGNAL_PAYLOAD)
    proc = subprocess.run([sys.executable, str(script), mode], cwd=REPO, env=_clean_env(), capture_output=True,
                          text=True, timeout=100, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["handled"] is True
    if mode == "route":
        assert rec["child_exitcode"] == 0
    else:
        # Without routing the helper dies of the signal: the failure launch/signals.py prevents.
        assert rec["child_exitcode"] == -signal.SIGUSR1


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("marker", ["writable", "unset", "unwritable"])
def test_preempted_exit_is_reported_through_the_marker(tmp_path, marker):
    """Driver exits 17 -> under the job scripts (marker path set and writable) the task exits 0 and the
    marker holds its rank; otherwise the 17 is kept, so a preemption is never mistaken for 'done'."""
    (tmp_path / "fake_driver.py").write_text("import sys\nsys.exit(17)\n")
    env = _clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", RANK="3", WORLD_SIZE="4")
    path = tmp_path / "marker"
    if marker == "writable":
        env["HCX_PREEMPT_MARKER"] = str(path)
    elif marker == "unwritable":
        env["HCX_PREEMPT_MARKER"] = str(tmp_path / "no" / "such" / "dir" / "marker")
    proc = subprocess.run([sys.executable, "-m", "launch.run", "--", "fake_driver"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=100)
    if marker == "writable":
        assert proc.returncode == 0, proc.stderr
        assert path.read_text() == "3\n"
    else:
        assert proc.returncode == 17, proc.stderr
