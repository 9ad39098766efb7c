"""The job-wide picture a dry run prints: which host runs which ranks, and where each rank sits in the
tensor/context/data/pipeline grid that megatron-core will build from the driver's flags.

Pure functions (no processes, no torch.distributed) so the dry run works on a login node and tests
can call them directly. Rank coordinates come from megatron-core's own RankGenerator with the order
parallel_state uses by default, so what we print is what initialize_model_parallel will build.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping, Sequence

from hcx_megatron.distributed.env import (
    _is_slurm_batch_shell,
    expand_slurm_nodelist,
    parse_slurm_tasks_per_node,
)

# megatron.core.parallel_state.initialize_model_parallel's default `order`.
MCORE_ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class JobHosts:
    """Hosts of the job in rank order and how many ranks each runs (Slurm's block distribution)."""

    hosts: tuple[str, ...]
    tasks_per_node: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return sum(self.tasks_per_node)

    def host_of_rank(self, rank: int) -> tuple[str, int]:
        """(host, local rank) of a global rank, ranks filling node 0 first as srun's default block layout."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        for host, n in zip(self.hosts, self.tasks_per_node):
            if rank < n:
                return host, rank
            rank -= n
        raise AssertionError("unreachable")


def job_hosts_from_env(env: Mapping[str, str]) -> JobHosts | None:
    """The Slurm allocation (inside a step or the batch shell) as JobHosts; None outside Slurm."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    hosts = expand_slurm_nodelist(nodelist)
    in_step = not _is_slurm_batch_shell(env)
    spec = (env.get("SLURM_STEP_TASKS_PER_NODE") if in_step else None) or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = parse_slurm_tasks_per_node(spec)
    else:
        counts = [int(env.get("SLURM_NTASKS_PER_NODE", 1))] * len(hosts)
    if len(counts) != len(hosts):
        raise ValueError(f"Slurm says {len(hosts)} hosts ({nodelist}) but tasks-per-node {spec!r} has {len(counts)}")
    return JobHosts(tuple(hosts), tuple(counts))


def simulated_hosts(nodes: int, tasks_per_node: int, prefix: str = "node") -> JobHosts:
    """A hypothetical allocation for planning on a login node (`--nodes 16 --tasks-per-node 8`)."""
    if nodes < 1 or tasks_per_node < 1:
        raise ValueError(f"--nodes ({nodes}) and --tasks-per-node ({tasks_per_node}) must be >= 1")
    width = max(3, len(str(nodes)))
    return JobHosts(tuple(f"{prefix}{i:0{width}d}" for i in range(1, nodes + 1)), (tasks_per_node,) * nodes)


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    sequence_parallel: bool
    distributed_optimizer: bool
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int
    model_preset: str
    num_layers: int
    parameters: int
    device: str


def parallel_layout_from_argv(driver_argv: Sequence[str], world_size: int, validate: bool = True) -> ParallelLayout:
    """Parse the driver's Megatron-LM flags with the project's parser (unknown driver-specific flags are
    ignored) and, when `validate`, run the same checks the driver runs before any process group.

    Raises hcx_megatron.config.args.ConfigError with the driver's own message on a bad layout.
    """
    from hcx_megatron.config.args import build_parser, config_from_args, validate_config
    from hcx_megatron.config.model import count_parameters

    ns, _unknown = build_parser().parse_known_args(list(driver_argv))
    planned_device = ns.device
    if ns.device == "auto":
        # A dry run happens on a login node without GPUs; the job itself will find them.
        ns = argparse.Namespace(**{**vars(ns), "device": "cuda"})
        planned_device = "cuda"
    cfg = config_from_args(ns, world_size=world_size)
    if validate:
        validate_config(cfg, check_installed=False)  # TE/DALI are checked by the ranks, on the nodes that train
    p, t = cfg.parallel, cfg.training
    model_ways = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    dp = max(world_size // model_ways, 1)
    return ParallelLayout(
        world_size=world_size,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        dp=dp,
        vpp=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=p.use_distributed_optimizer,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        num_microbatches=t.global_batch_size // max(t.micro_batch_size * dp, 1),
        seq_length=t.seq_length,
        model_preset=cfg.model.name,
        num_layers=cfg.model.num_layers,
        parameters=count_parameters(cfg.model, cfg.padded_vocab_size),
        device=planned_device,
    )


def rank_coordinates(layout: ParallelLayout) -> list[dict[str, int]]:
    """For every global rank its tp/cp/dp/pp index, from megatron-core's RankGenerator."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.cp, order=MCORE_ORDER)
    coords: list[dict[str, int]] = [dict() for _ in range(layout.world_size)]
    for token in ("tp", "cp", "dp", "pp"):
        for group in gen.get_ranks(token):
            for idx, rank in enumerate(group):
                coords[rank][token] = idx
    return coords


def groups_spanning_nodes(hosts: JobHosts, layout: ParallelLayout, kind: str = "tp") -> list[list[int]]:
    """megatron-core's `kind` groups (tp, cp, dp, pp; RankGenerator, the order parallel_state uses) whose ranks
    sit on more than one host. Tensor parallelism all-reduces in every layer, so a TP group must stay inside a
    node (NVLink); this is empty for every shipped layout (tests/test_slurm_placement.py)."""
    from megatron.core.parallel_state import RankGenerator

    if layout.world_size != hosts.world_size:
        raise ValueError(f"layout world size {layout.world_size} != job ranks {hosts.world_size}")
    gen = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.cp, order=MCORE_ORDER)
    return [group for group in gen.get_ranks(kind)
            if len({hosts.host_of_rank(r)[0] for r in group}) > 1]


def _ranges(values: Sequence[int]) -> str:
    """[0,1,2,5] -> "0-2,5" so a 128-rank table stays readable."""
    vals = sorted(set(values))
    out, start, prev = [], None, None
    for v in vals:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out)


def format_layout(hosts: JobHosts, layout: ParallelLayout | None, per_rank_limit: int = 32) -> str:
    """Human-readable report: job summary, per-node rank blocks and grid positions, per-rank rows when small."""
    lines = [f"job: {len(hosts.hosts)} node(s) x {_ranges(hosts.tasks_per_node)} task(s) = "
             f"{hosts.world_size} ranks; master {hosts.hosts[0]}"]
    coords = None
    if layout is not None:
        vpp = f" VPP{layout.vpp}" if layout.vpp else ""
        flags = [name for name, on in (("SP", layout.sequence_parallel), ("dist-opt", layout.distributed_optimizer))
                 if on]
        lines.append(
            f"layout: TP{layout.tp} x PP{layout.pp}{vpp} x CP{layout.cp} x DP{layout.dp}"
            f"{' + ' + ' + '.join(flags) if flags else ''} on {layout.device}; model {layout.model_preset} "
            f"({layout.num_layers} layers, {layout.parameters / 1e9:.2f}B params)")
        lines.append(
            f"batch: micro {layout.micro_batch_size} x {layout.num_microbatches} microbatches x DP{layout.dp} = "
            f"global {layout.global_batch_size} sequences of {layout.seq_length} tokens "
            f"({layout.global_batch_size * layout.seq_length:,} tokens/step)")
        if layout.world_size != hosts.world_size:
            lines.append(f"WARNING: layout world size {layout.world_size} != job ranks {hosts.world_size}")
        else:
            coords = rank_coordinates(layout)
            spanning = groups_spanning_nodes(hosts, layout, "tp")
            if spanning:
                lines.append(f"WARNING: {len(spanning)} TP group(s) span nodes (first: ranks {_ranges(spanning[0])}); "
                             f"tensor-parallel traffic would leave the node: use TP <= tasks per node")
            else:
                lines.append("placement: every TP group inside one node")
    rank = 0
    for host, n in zip(hosts.hosts, hosts.tasks_per_node):
        ranks = list(range(rank, rank + n))
        row = f"  {host}: ranks {_ranges(ranks)}"
        if coords is not None:
            row += (f" | pp stage {_ranges([coords[r]['pp'] for r in ranks])}"
                    f" | tp {_ranges([coords[r]['tp'] for r in ranks])}"
                    f" | dp {_ranges([coords[r]['dp'] for r in ranks])}"
                    f" | cp {_ranges([coords[r]['cp'] for r in ranks])}")
        lines.append(row)
        rank += n
    if coords is not None and hosts.world_size <= per_rank_limit:
        lines.append("  rank host local tp cp dp pp")
        for r in range(hosts.world_size):
            host, local = hosts.host_of_rank(r)
            c = coords[r]
            lines.append(f"  {r:4d} {host} {local:5d} {c['tp']:2d} {c['cp']:2d} {c['dp']:2d} {c['pp']:2d}")
    return "\n".join(lines)
