"""Preemption: SIGUSR1 (Slurm's --signal=B:USR1@N) or SIGTERM -> finish the step, save, exit 17.

Handlers only set a flag; the loop checks it after each optimizer step and all ranks agree on it through a
max all-reduce, so a signal delivered to any one rank stops every rank at the same iteration.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_CODE_PREEMPTED = 17  # slurm/*.sh requeue the job on this code

_received: list[int] = []


def install_handlers(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    for sig in signals:
        signal.signal(sig, lambda signum, frame: _received.append(signum))


def received_locally() -> bool:
    return bool(_received)


def any_rank_received(device: str) -> bool:
    flag = torch.tensor([1.0 if _received else 0.0], device="cuda" if device == "cuda" else "cpu")
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reset() -> None:
    _received.clear()
