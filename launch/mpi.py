"""Rendezvous for ranks started by `mpirun`: MPI knows every rank, but torch.distributed needs one
address and port that all ranks agree on. Rank 0 picks them and broadcasts them over MPI (mpi4py).

Without mpi4py a single-node mpirun still works (127.0.0.1 and a fixed port); a multi-node one needs
MASTER_ADDR/MASTER_PORT set by the user, and we say so instead of hanging in a rendezvous.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Mapping

MPI_SIZE_KEYS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def in_mpi_job(env: Mapping[str, str]) -> bool:
    """True when an MPI launcher (mpirun/mpiexec) started this process and torchrun did not. A Slurm
    step whose only MPI variables are PMI/PMIx (`srun --mpi=pmix`) is a Slurm job: srun's variables
    already name the hosts, no MPI initialisation needed."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return False
    if "OMPI_COMM_WORLD_SIZE" in env:
        return True
    in_slurm_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    return any(k in env for k in MPI_SIZE_KEYS) and not in_slurm_step


def single_node_mpi(env: Mapping[str, str]) -> bool:
    """All ranks on this host (OpenMPI tells us via its local size)."""
    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    size = env.get("OMPI_COMM_WORLD_SIZE")
    return local is not None and size is not None and local == size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MpiRendezvous:
    master_addr: str
    master_port: int
    hosts: tuple[str, ...]  # hostname of every rank, in rank order


def mpi4py_rendezvous(env: Mapping[str, str]) -> MpiRendezvous:
    """Collective over COMM_WORLD: every rank must call it. Rank 0 chooses address and port (or takes
    MASTER_ADDR/MASTER_PORT from its environment) and everybody receives rank 0's choice."""
    from mpi4py import MPI  # type: ignore[import-not-found]

    comm = MPI.COMM_WORLD
    hosts = tuple(comm.allgather(socket.gethostname()))
    choice = None
    if comm.Get_rank() == 0:
        # A port that is free on rank 0's host right now; torch's TCPStore binds it moments later.
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else socket.gethostname())
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
        choice = (addr, port)
    addr, port = comm.bcast(choice, root=0)
    return MpiRendezvous(addr, int(port), hosts)
