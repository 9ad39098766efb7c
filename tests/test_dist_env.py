"""Rank/world/master resolution from launcher environments (pure functions, no processes)."""

from __future__ import annotations

import pytest

from hcx_megatron.distributed.env import (
    DEFAULT_MASTER_PORT,
    expand_slurm_nodelist,
    local_world_size_from_env,
    parse_slurm_tasks_per_node,
    resolve_dist_env,
    torch_env,
    world_size_from_env,
)

# What srun put into task 9 of a 2-node x 8-task step (observed variable names, Slurm 22.05).
SLURM_STEP_TASK_9 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nodelist,expected", [
    ("vm", ["vm"]),
    ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a-[01-02].cluster", ["a-01.cluster", "a-02.cluster"]),
])
def test_expand_slurm_nodelist(nodelist, expected):
    assert expand_slurm_nodelist(nodelist) == expected


@pytest.mark.timeout(30)
def test_expand_slurm_nodelist_rejects_bad_range():
    with pytest.raises(ValueError, match="bad range"):
        expand_slurm_nodelist("gpu[009-001]")


@pytest.mark.timeout(30)
def test_parse_tasks_per_node():
    assert parse_slurm_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert parse_slurm_tasks_per_node("2") == [2]
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_slurm_tasks_per_node("8(2)")


@pytest.mark.timeout(30)
def test_slurm_step_task():
    d = resolve_dist_env(SLURM_STEP_TASK_9)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (9, 16, 1, "gpu017", "slurm")
    # Concurrent jobs sharing nodes get different ports, deterministically per job.
    assert d.master_port == DEFAULT_MASTER_PORT + 242
    assert local_world_size_from_env(SLURM_STEP_TASK_9) == 8


@pytest.mark.timeout(30)
def test_slurm_batch_shell_is_one_process():
    """The sbatch script's shell has SLURM_PROCID=0/SLURM_NTASKS=16 but is not rank 0 of 16."""
    batch = {k: v for k, v in SLURM_STEP_TASK_9.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    d = resolve_dist_env(batch)
    assert (d.rank, d.world_size, d.source) == (0, 1, "single")
    assert world_size_from_env(batch) == 1


@pytest.mark.timeout(30)
def test_mpirun_inside_slurm_allocation_uses_mpi_ranks():
    """mpirun inside sbatch: every rank inherits the batch shell's SLURM_PROCID=0; OMPI's rank must win."""
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1",
           "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    d = resolve_dist_env(env, use_mpi4py=False)
    assert (d.rank, d.world_size, d.local_rank, d.source) == (3, 4, 3, "mpi")
    assert local_world_size_from_env(env) == 4


@pytest.mark.timeout(30)
def test_torchrun_wins_and_round_trips():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
           **SLURM_STEP_TASK_9}
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.master_addr, d.master_port, d.source) == (1, 2, "10.0.0.1", 1234, "torchrun")
    exported = torch_env(d, local_world_size=2)
    assert resolve_dist_env(exported) == d
    assert exported["LOCAL_WORLD_SIZE"] == "2"


@pytest.mark.timeout(30)
def test_single_process_default():
    d = resolve_dist_env({})
    assert (d.rank, d.world_size, d.local_rank, d.source) == (0, 1, 0, "single")
    assert local_world_size_from_env({}) == 1


@pytest.mark.timeout(30)
def test_srun_with_pmix_uses_slurm_hosts():
    """srun --mpi=pmix sets PMIX_RANK too; the master must still be the step's first node, not 127.0.0.1."""
    env = {**SLURM_STEP_TASK_9, "PMIX_RANK": "9", "PMIX_SIZE": "16"}
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.master_addr, d.source) == (9, 16, "gpu017", "slurm")

    from launch.mpi import in_mpi_job

    assert not in_mpi_job(env)
    assert in_mpi_job({"PMIX_RANK": "0", "PMIX_SIZE": "2"})  # mpiexec outside Slurm
    assert in_mpi_job({**SLURM_STEP_TASK_9, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})


@pytest.mark.timeout(30)
def test_mpirun_ranks_inside_orted_step():
    """Multi-node mpirun under Slurm starts orteds with srun: ranks inherit that step's SLURM_PROCID
    (the node index) and SLURM_STEP_ID; OpenMPI's own variables are the truth."""
    env = {**SLURM_STEP_TASK_9, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "OMPI_COMM_WORLD_RANK": "12", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "4"}
    d = resolve_dist_env(env, use_mpi4py=False)
    assert (d.rank, d.world_size, d.local_rank, d.source) == (12, 16, 4, "mpi")
