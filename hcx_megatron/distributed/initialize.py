"""Process groups: torch.distributed (NCCL on GPU, gloo in CPU mode) + megatron-core parallel_state."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from hcx_megatron.config.args import Config, resolve_device
from hcx_megatron.distributed import cpu_mode
from hcx_megatron.distributed.env import DistEnv, resolve_dist_env


def initialize_distributed(cfg: Config) -> tuple[DistEnv, str]:
    """Start torch.distributed and megatron parallel_state. Returns (env, device). Idempotent."""
    env = resolve_dist_env()
    # A partitioned job (hcx_megatron.distributed.partition) has already made this process's block the
    # default group: megatron then sees the block as its whole world.
    world = dist.get_world_size() if dist.is_initialized() else env.world_size
    if world != cfg.runtime.world_size:
        raise RuntimeError(f"world size from the launcher ({world}) differs from the one the config was "
                           f"validated with ({cfg.runtime.world_size})")
    device = resolve_device(cfg.runtime.device)
    if device == "cpu":
        cpu_mode.activate()
        backend = "gloo"
        # Each rank on a shared CPU box gets a fair share of cores instead of oversubscribing.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, _local_world_size(env))))
    else:
        backend = "nccl"
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=cfg.runtime.distributed_timeout_minutes),
        )
    if not ps.model_parallel_is_initialized():
        p = cfg.parallel
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            distributed_timeout_minutes=cfg.runtime.distributed_timeout_minutes,
        )
    set_random_seed(cfg.training.seed)
    return env, device


def _local_world_size(env: DistEnv) -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.split("(")[0].isdigit():
            return int(value.split("(")[0])
    return env.world_size


def set_random_seed(seed: int) -> None:
    """Megatron-LM's scheme: offset by pipeline rank; TP RNG tracker for dropout inside TP regions.
    (Weights do not depend on these streams: see hcx_megatron.model.init.)"""
    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
