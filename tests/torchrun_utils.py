"""Launch real multi-process CPU runs (torchrun on gloo) from tests, and read their metrics."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

from hcx_megatron.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Rendezvous ports are drawn from [PORT_FLOOR, start of the kernel's ephemeral range); see free_port.
PORT_FLOOR = 20000


def free_port() -> int:
    """A TCP port nothing is bound to, for a rendezvous (MASTER_PORT) or a test daemon; the one such helper of the
    tests. Drawn below the kernel's ephemeral range: the launcher binds it seconds later, and an ephemeral port
    could meanwhile go to any socket another test opens (gloo binds one per peer), a race that parallel test
    workers (pytest-xdist) would make likely. Ports below that range are only ever bound explicitly."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 0
    rng = random.SystemRandom()
    for _ in range(200):
        # Without room below the range (an unusual sysctl), the kernel picks (port 0).
        port = rng.randrange(PORT_FLOOR, ephemeral_start) if ephemeral_start - PORT_FLOOR >= 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port found")


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
