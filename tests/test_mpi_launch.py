"""`mpirun -np 2` (Debian OpenMPI) + mpi4py starts a 2-rank CPU run through launch/: rank 0 picks the
rendezvous address and a free port and broadcasts them over MPI; torch.distributed (gloo) then forms the
process group. Proven with the all-reduce selftest, the dry run, and the pretraining driver itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]


def _mpirun() -> list[str]:
    exe = shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
        have_mpi4py = True
    except ImportError:
        have_mpi4py = False
    if (exe is None or not have_mpi4py) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "tools" / "install_system_deps.sh")], capture_output=True, timeout=900)
        exe = shutil.which("mpirun")
        have_mpi4py = subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode == 0
    if exe is None or not have_mpi4py:
        pytest.fail("OpenMPI (openmpi-bin) or mpi4py missing and not installable here "
                    "(tools/install_system_deps.sh needs root + apt-get)")
    argv = [exe, "-np", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")  # Debian's OpenMPI refuses root otherwise (CI runs as root)
    # TCP between the two local ranks; no shared-memory single-copy (CMA is often blocked in containers).
    argv += ["--mca", "btl", "self,tcp"]
    return argv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def mpirun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([*_mpirun(), sys.executable, "-m", "launch.run", "--mpi", "on", *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(240)
def test_mpirun_selftest_allreduce(tmp_path):
    report = tmp_path / "selftest.jsonl"
    proc = mpirun(["--", "launch.selftest", "--report-jsonl", str(report)], timeout=230)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "selftest rank 0/2" in proc.stdout and "selftest rank 1/2" in proc.stdout
    rec = json.loads(report.read_text().splitlines()[-1])
    assert rec == {**rec, "world_size": 2, "allreduce": 1.0, "ok": True}
    # Both ranks agreed on one broadcast port (not the fixed default).
    ports = {line.split("master ")[1].split()[0] for line in proc.stdout.splitlines() if "selftest rank" in line}
    assert len(ports) == 1


@pytest.mark.timeout(240)
def test_mpirun_dry_run_reports_mpi_ranks():
    proc = mpirun(["--dry-run", "--", "hcx_megatron.pretrain", "--model-preset", "hcx-tiny", "--device", "cpu",
                   "--mock-data", "--global-batch-size", "4"], timeout=230)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "[rank 0/2] source=mpi local_rank=0/2" in proc.stdout
    assert "[rank 1/2] source=mpi local_rank=1/2" in proc.stdout
    assert "TP1 x PP1 x CP1 x DP2 on cpu" in proc.stdout


@pytest.mark.timeout(600)
def test_mpirun_starts_pretraining_driver(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    ckpt = tmp_path / "ckpt"
    proc = mpirun(["--", "hcx_megatron.pretrain", "--model-preset", "hcx-tiny", "--device", "cpu", "--mock-data",
                   "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "1", "--seq-length", "64",
                   "--save", str(ckpt), "--save-interval", "4", "--metrics-jsonl", str(metrics)], timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    # Two data-parallel ranks: the total token rate is twice the per-GPU rate.
    assert train[-1]["tokens_per_sec"] == pytest.approx(2 * train[-1]["tokens_per_sec_per_gpu"], rel=1e-6)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000004").is_dir()
