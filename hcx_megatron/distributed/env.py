"""Where this process sits in the job: rank, world size, local rank and rendezvous address.

Read from (first match wins): torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR), Slurm (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, master = first host of SLURM_JOB_NODELIST), MPI (OpenMPI/PMI env
variables, or mpi4py when installed). Pure functions of an environment mapping so tests need no
processes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "mpi" | "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. "gpu[001-003,007],login1" -> [gpu001, ..., login1]."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _port_for_job(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID")
    # Spread concurrent jobs on shared nodes over ports deterministically.
    return DEFAULT_MASTER_PORT + (int(job) % 1000 if job and job.isdigit() else 0)


def resolve_dist_env(env: Mapping[str, str] | None = None, use_mpi4py: bool = True) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port_for_job(env),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=_port_for_job(env),
            source="slurm",
        )
    for rank_key, size_key, local_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ):
        if rank_key in env and size_key in env:
            return DistEnv(
                rank=int(env[rank_key]),
                world_size=int(env[size_key]),
                local_rank=int(env.get(local_key, 0)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_port_for_job(env),
                source="mpi",
            )
    if use_mpi4py and env is os.environ and "HCX_USE_MPI4PY" in env:
        try:
            from mpi4py import MPI  # type: ignore[import-not-found]
        except ImportError as exc:  # pragma: no cover - only with the [mpi] extra
            raise RuntimeError("HCX_USE_MPI4PY is set but mpi4py is not installed (pip install .[mpi])") from exc
        comm = MPI.COMM_WORLD
        return DistEnv(comm.Get_rank(), comm.Get_size(), 0, env.get("MASTER_ADDR", "127.0.0.1"),
                       _port_for_job(env), "mpi")
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _port_for_job(env), "single")


def world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    return resolve_dist_env(env, use_mpi4py=False).world_size
