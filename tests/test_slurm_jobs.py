"""`sbatch slurm/pretrain_hcx_l.sh` on a real single-node Slurm (slurm-wlm + munge, CPUs only), with the
pretraining driver in CPU mode: a run to completion, preemption -> requeue -> resume (then a crashed
rank -> requeue -> resume from the last complete checkpoint) that ends exactly where an uninterrupted
run ends, a failing job that stops requeueing, and the dry run inside an allocation.

Skips, with the reason, only where slurm-wlm cannot be installed (tests/slurm_cluster.py tries
tools/install_system_deps.sh first).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, TERMINAL_STATES, free_port, unavailable_reason

pytestmark = pytest.mark.slurm  # starts a Slurm cluster; not in `make test-fast`

TRAIN_ITERS = 40
SAVE_INTERVAL = 5
# hcx-tiny in CPU mode, 2 ranks (DP2), a few seconds of training per run.
TINY = dict(MODEL_PRESET="hcx-tiny", DEVICE="cpu", MOCK_DATA="1", TP="1", PP="1", VP_LAYERS="", CP="1", SP="0",
            DIST_OPT="0", OVERLAP="0", RECOMPUTE="none", MICRO_BATCH="1", GLOBAL_BATCH="4", SEQ_LENGTH="64",
            TRAIN_ITERS=str(TRAIN_ITERS), SAVE_INTERVAL=str(SAVE_INTERVAL), EVAL_INTERVAL="0", LR="3e-4",
            MIN_LR="3e-5", WARMUP_ITERS="2", SEED="1234")
# The command-line overrides of the 8xH100 #SBATCH header that turn it into a 2-task CPU job.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=20:00"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:  # `make test` installs Slurm (tools/install_system_deps.sh): a missing cluster is a failure
        pytest.fail(f"no test Slurm cluster: {reason}")
    c = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def _job_env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env.update(TINY)
    env.update(RUN_DIR=str(run_dir), MASTER_PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", HCX_REPO=str(REPO))
    try:
        socket.gethostbyname(socket.gethostname().split(".")[0])
    except OSError:
        # launch.run uses the node name as rendezvous address; a CI box whose own name does not resolve
        # would fail on that, not on anything under test.
        env["MASTER_ADDR"] = "127.0.0.1"
    env.update(extra)
    return env


def submit(cluster: SlurmCluster, run_dir: Path, script: str = "slurm/pretrain_hcx_l.sh", **extra: str) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch([*CPU_JOB, f"--output={run_dir.parent}/{run_dir.name}-slurm-%j.out", script],
                          env=_job_env(run_dir, **extra), cwd=REPO)


def batch_log(run_dir: Path, job: int) -> str:
    p = run_dir.parent / f"{run_dir.name}-slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def diagnostics(run_dir: Path, job: int) -> str:
    logs = sorted((run_dir / "logs").glob("train-*.log"))
    tail = logs[-1].read_text(errors="replace")[-4000:] if logs else "(no step log)"
    return f"--- batch log\n{batch_log(run_dir, job)}\n--- step log tail\n{tail}"


def records(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return out


def train_by_iteration(run_dir: Path) -> dict[int, dict]:
    """Last train record per iteration (a crashed run's iterations after its last checkpoint are redone)."""
    return {r["iteration"]: r for r in records(run_dir) if r.get("kind") == "train"}


def attempts(run_dir: Path) -> list[dict]:
    p = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def checkpoint_iteration(run_dir: Path) -> int:
    p = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    try:
        return int(p.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_until(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def step_pids(job: int, procid: int, helpers: bool = False) -> list[int]:
    """Our job's launch.run processes for one rank, found through their environment; with `helpers` also the
    processes they started (dist_checkpointing's spawned Manager, multiprocessing's resource tracker)."""
    rank, parent = [], {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (env.get(b"SLURM_JOB_ID") == str(job).encode() and env.get(b"SLURM_PROCID") == str(procid).encode()
                and b"SLURM_STEP_ID" in env):
            parent[int(d.name)] = ppid
            if b"launch.run" in cmd:
                rank.append(int(d.name))
    if not helpers:
        return rank
    tree, grew = set(rank), True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return sorted(tree)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The reference: one job, no interruption."""
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    job = submit(cluster, run_dir)
    info = cluster.wait_job(job, TERMINAL_STATES, timeout=900)
    assert info["JobState"] == "COMPLETED", f"{info}\n{diagnostics(run_dir, job)}"
    return run_dir, job, info


@pytest.mark.timeout(1000)
def test_pretrain_job_runs_to_completion(uninterrupted):
    run_dir, job, info = uninterrupted
    assert info["ExitCode"] == "0:0" and info.get("Restarts") == "0"
    by_iter = train_by_iteration(run_dir)
    assert sorted(by_iter) == list(range(1, TRAIN_ITERS + 1))
    last = by_iter[TRAIN_ITERS]
    assert last["consumed_samples"] == TRAIN_ITERS * 4 and last["seq_length"] == 64
    # DP2: two ranks really trained (throughput per GPU is half the total).
    assert last["tokens_per_sec"] == pytest.approx(2 * last["tokens_per_sec_per_gpu"], rel=1e-6)
    assert 0 < last["lm_loss"] < by_iter[1]["lm_loss"] + 1.0
    # The checkpoint: tracker written last, final iteration directory present.
    assert checkpoint_iteration(run_dir) == TRAIN_ITERS
    assert (run_dir / "checkpoints" / f"iter_{TRAIN_ITERS:07d}").is_dir()
    saves = [r["iteration"] for r in records(run_dir) if r.get("event") == "save"]
    assert saves[:2] == [SAVE_INTERVAL, 2 * SAVE_INTERVAL] and saves[-1] == TRAIN_ITERS
    # Logs under the run dir: the step log and a link to the batch log.
    assert (run_dir / "logs" / f"train-{job}.log").stat().st_size > 0
    assert (run_dir / "logs" / f"batch-{job}.out").resolve() == (run_dir.parent / f"{run_dir.name}-slurm-{job}.out")
    assert [a["decision"] for a in attempts(run_dir)] == ["done"]


@pytest.mark.timeout(1500)
def test_preempt_requeue_crash_resume_matches_uninterrupted(cluster, uninterrupted, tmp_path_factory):
    ref_dir, _, _ = uninterrupted
    run_dir = tmp_path_factory.mktemp("runs") / "interrupted"
    job = submit(cluster, run_dir)
    try:
        # 1) Preemption: USR1 to the batch shell (what --signal=B:USR1@180 does before the time limit).
        wait_until(lambda: max(train_by_iteration(run_dir), default=0) >= 3, 600, "iteration 3 of the first run")
        cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
        # 2) The requeued run (released from Slurm's requeue delay) resumes; once it has saved a new
        #    checkpoint, SIGKILL rank 1: a crash, as a node failure looks to the job.
        def resumed_and_saved():
            info = cluster.job(job)
            cluster.release_requeued(info)
            a = attempts(run_dir)
            if len(a) > 1 or (a and a[0]["decision"] != "requeue") or info.get("JobState") in TERMINAL_STATES:
                # The first run was not a preemption, or the resumed run ended before we could crash it.
                raise AssertionError(f"unexpected attempts {a}, job {info.get('JobState')}\n"
                                     f"{diagnostics(run_dir, job)}")
            return (len(a) == 1 and checkpoint_iteration(run_dir) > a[0]["ckpt_after"]
                    and step_pids(job, 1, helpers=True))
        # The rank with its helpers: a helper left alive (orphaned, holding the step's stdout) makes slurmstepd
        # wait 60 s before it abandons the step's IO; a crashed node takes them all.
        pids = wait_until(resumed_and_saved, 600, "the resumed run to save a checkpoint", poll=0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # a helper that ended on its own since the scan
                pass
        # 3) The crash is requeued too, and the third run finishes from the last complete checkpoint.
        info = cluster.wait_job(job, TERMINAL_STATES, timeout=900, on_poll=cluster.release_requeued)
    except BaseException:
        print(diagnostics(run_dir, job))
        raise
    assert info["JobState"] == "COMPLETED", f"{info}\n{diagnostics(run_dir, job)}"
    runs = attempts(run_dir)
    assert [a["decision"] for a in runs] == ["requeue", "requeue", "done"], runs
    assert runs[0]["rc"] == 17 and runs[0]["signalled"] == 1 and 0 < runs[0]["ckpt_after"] < TRAIN_ITERS
    assert runs[1]["rc"] != 0 and runs[1]["ckpt_before"] == runs[0]["ckpt_after"]
    assert runs[1]["ckpt_after"] > runs[1]["ckpt_before"], "crash came after a new checkpoint"
    assert [a["restart_count"] for a in runs] == [0, 1, 2] and info["Restarts"] == "2"
    events = [r for r in records(run_dir) if r.get("kind") == "event"]
    assert any(e.get("event") == "preempted" and e["iteration"] == runs[0]["ckpt_after"] for e in events)

    # Same final step count and loss as the uninterrupted run; in fact every iteration's loss.
    ref, got = train_by_iteration(ref_dir), train_by_iteration(run_dir)
    assert max(got) == TRAIN_ITERS and checkpoint_iteration(run_dir) == TRAIN_ITERS
    assert got[TRAIN_ITERS]["consumed_samples"] == ref[TRAIN_ITERS]["consumed_samples"]
    assert got[TRAIN_ITERS]["lm_loss"] == pytest.approx(ref[TRAIN_ITERS]["lm_loss"], abs=1e-6)
    for it in range(1, TRAIN_ITERS + 1):
        assert got[it]["lm_loss"] == pytest.approx(ref[it]["lm_loss"], abs=1e-6), f"iteration {it}"
        assert got[it]["lr"] == pytest.approx(ref[it]["lr"], rel=1e-9), f"iteration {it}"


@pytest.mark.timeout(900)
def test_failing_job_stops_requeueing(cluster, tmp_path_factory):
    """A job that can never start (TP3 does not divide 2 ranks) is requeued, then given up: not forever."""
    run_dir = tmp_path_factory.mktemp("runs") / "failing"
    job = submit(cluster, run_dir, TP="3", MAX_FAILURES="2")
    info = cluster.wait_job(job, TERMINAL_STATES, timeout=800, on_poll=cluster.release_requeued)
    runs = attempts(run_dir)
    assert info["JobState"] == "FAILED", f"{info}\n{diagnostics(run_dir, job)}"
    assert [a["decision"] for a in runs] == ["requeue", "stop"], runs
    assert all(a["rc"] != 0 and a["ckpt_after"] == 0 for a in runs)
    assert info["Restarts"] == "1"
    assert "not requeueing" in batch_log(run_dir, job)
    step_log = (run_dir / "logs" / f"train-{job}.log").read_text(errors="replace")
    assert "--tensor-model-parallel-size" in step_log  # the driver's own error names the flag


@pytest.mark.timeout(600)
def test_dry_run_inside_allocation(cluster, tmp_path_factory):
    """HCX_DRY_RUN=1 in a real 2-task allocation: every rank reports what launch.run resolved from srun's
    variables, rank 0 prints the layout; nothing trains."""
    run_dir = tmp_path_factory.mktemp("runs") / "dry"
    job = submit(cluster, run_dir, HCX_DRY_RUN="1")
    info = cluster.wait_job(job, TERMINAL_STATES, timeout=500)
    out = batch_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{out}"
    assert f"[rank 0/2] source=slurm local_rank=0/2 master={cluster.node}:" in out
    assert f"[rank 1/2] source=slurm local_rank=1/2 master={cluster.node}:" in out
    assert "1 node(s) x 2 task(s) = 2 ranks" in out and "TP1 x PP1 x CP1 x DP2 on cpu" in out
    assert not (run_dir / "metrics.jsonl").exists()
