"""Launch real multi-process CPU runs (torchrun on gloo) from tests, and read their metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from hcx_megatron.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], nproc: int, timeout: float = 600, check: bool = True,
             env: dict | None = None, cwd: str = REPO) -> subprocess.CompletedProcess:
    """`python -m module args` on `nproc` CPU processes; the one torchrun helper of the tests."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", module, *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def pretrain(args: list[str], nproc: int, **kw) -> subprocess.CompletedProcess:
    return torchrun("hcx_megatron.pretrain", ["--device", "cpu", "--log-interval", "1000", *args], nproc, **kw)


__all__ = ["free_port", "torchrun", "pretrain", "read_metrics", "REPO"]
