"""Where this process sits in the job: rank, world size, local rank and rendezvous address.

Read from (first match wins): torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR), OpenMPI's mpirun
(OMPI_COMM_WORLD_*), Slurm job steps (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, master =
first host of the step's node list), other MPI launchers (PMI_*/PMIX_*), mpi4py when HCX_USE_MPI4PY is
set. Pure functions of an environment mapping so tests need no processes.

Why OpenMPI before Slurm: `mpirun` inside an sbatch allocation inherits the batch shell's (or its
orted step's) SLURM_PROCID in every rank, while OMPI_COMM_WORLD_RANK is set per process. Why Slurm
before PMI/PMIx: `srun --mpi=pmix` sets both with the same ranks, and only Slurm's say where the
master is. Why Slurm needs a step: the batch
shell itself has SLURM_PROCID=0 and SLURM_NTASKS=N but is one process, not rank 0 of N; only inside
`srun` (SLURM_STEP_ID set) do those variables describe this process.
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
        hosts.extend(_expand_host_pattern(part))
    return hosts


def _expand_host_pattern(part: str) -> list[str]:
    """One comma-free pattern; brackets may repeat ("r[1-2]n[01-02]"), so expand the first and recurse."""
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
    if not m:
        return [part]
    prefix, ranges, suffix = m.groups()
    out: list[str] = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {r!r} in Slurm node list pattern {part!r}")
            values = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            values = [r]
        for v in values:
            out.extend(_expand_host_pattern(prefix + v + suffix))
    return out


def _port_for_job(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID")
    # Spread concurrent jobs on shared nodes over ports deterministically.
    return DEFAULT_MASTER_PORT + (int(job) % 1000 if job and job.isdigit() else 0)


def _is_slurm_batch_shell(env: Mapping[str, str]) -> bool:
    """The sbatch script's own shell: a job id but no step id (srun tasks always have SLURM_STEP_ID)."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env


def parse_slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE, e.g. "8(x2),4" -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node spec {spec!r} at {part!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def local_world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    """Processes on this node (LOCAL_WORLD_SIZE for torch); 1 when the launcher does not say."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    for key in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE"):
        if key in env:
            return int(env[key])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec and not _is_slurm_batch_shell(env):
        counts = parse_slurm_tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", 0))
        return counts[node] if node < len(counts) else counts[-1]
    return 1


def torch_env(dist: DistEnv, local_world_size: int = 1) -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous (and our drivers) read, as torchrun sets them."""
    return {
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
    }


def _mpi_env(env: Mapping[str, str], keys: tuple[str, str, str]) -> DistEnv | None:
    rank_key, size_key, local_key = keys
    if rank_key not in env or size_key not in env:
        return None
    return DistEnv(
        rank=int(env[rank_key]),
        world_size=int(env[size_key]),
        local_rank=int(env.get(local_key, 0)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port_for_job(env),
        source="mpi",
    )


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
    # OpenMPI's mpirun sets OMPI_COMM_WORLD_* per rank; under an allocation its ranks also inherit the
    # Slurm variables of the orted step (SLURM_PROCID = node index), so OpenMPI must win.
    mpi = _mpi_env(env, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"))
    if mpi is not None:
        return mpi
    # srun --mpi=pmi2/pmix also sets PMI_*/PMIX_* (same ranks); Slurm's variables know the master host.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not _is_slurm_batch_shell(env):
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                    or "127.0.0.1")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=_port_for_job(env),
            source="slurm",
        )
    for keys in (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"), ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK")):
        mpi = _mpi_env(env, keys)
        if mpi is not None:
            return mpi
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
