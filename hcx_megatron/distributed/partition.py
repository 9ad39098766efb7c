"""Rank partitions: one job, several independent megatron worlds, joined by small bridge groups.

Used where different models of one job need different layouts on different ranks (PPO: actor, critic,
reference and reward model, see hcx_megatron/rlhf/placement.py). The launcher's world (torchrun, srun,
mpirun) is cut into contiguous blocks; in each block the DEFAULT torch.distributed group is made of that
block's ranks only, so megatron-core's parallel_state, schedules, DDP, optimizer and dist_checkpointing run
in the block exactly as they would in a job of that size, unchanged. Blocks talk through groups that are not
the default one, built from the same rendezvous store with their own key prefixes:

- `leaders`: the first rank of every block (gloo). Blocks exchange small pickled messages (rollout batches,
  statistics, stop/preemption flags) leader to leader; a leader then broadcasts inside its block.
- `pair(other)`: rank j of this block and rank j of an equally sized block (gloo), for shard-to-shard weight
  transfer between two models of the same layout (async rollouts).

gloo for the bridge: messages are small next to a training step (a rollout batch of 512 x 4096 tokens is
~8 MiB per field), they need no GPU stream synchronisation, and every launcher gives a TCP store. Weight
transfer over gloo is a host copy; on large GPU jobs that is the cost of --async-rollouts (stated in
docs/rlhf.md). gloo sends complete only when the receiver takes them, which the PPO protocols rely on
(every send has a matching receive at a known point).
"""

from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hcx_megatron.distributed.env import DistEnv


@dataclass(frozen=True)
class Block:
    name: str
    start: int  # first global rank
    size: int

    @property
    def ranks(self) -> range:
        return range(self.start, self.start + self.size)


def layout_blocks(sizes: list[tuple[str, int]]) -> list[Block]:
    """Contiguous blocks in the given order: [("actor", 2), ("critic", 1)] -> actor 0-1, critic 2."""
    out, start = [], 0
    for name, size in sizes:
        if size < 1:
            raise ValueError(f"partition {name!r} needs at least one rank, got {size}")
        out.append(Block(name, start, size))
        start += size
    return out


def block_of(blocks: list[Block], rank: int) -> Block:
    for b in blocks:
        if rank in b.ranks:
            return b
    raise ValueError(f"rank {rank} is in no partition ({blocks})")


@dataclass
class Partition:
    """This process's place: its block, its rank inside it, and the bridge groups."""

    block: Block
    blocks: list[Block]
    global_rank: int
    store: Any
    timeout: datetime.timedelta
    leaders: Any = None  # gloo group of block leaders (only on leaders)
    _pairs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def local_rank(self) -> int:
        return self.global_rank - self.block.start

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    def has(self, name: str) -> bool:
        return any(b.name == name for b in self.blocks)

    def _leader_index(self, name: str) -> int:
        for i, b in enumerate(self.blocks):
            if b.name == name:
                return i
        raise KeyError(f"no partition {name!r}")

    # -- leader-to-leader messages ----------------------------------------------------------------------
    def send(self, to: str, tag: int, obj: Any) -> None:
        """Leader only: pickle `obj` (CPU tensors inside) and send it to partition `to`'s leader. Returns when
        that leader has received it."""
        data = _pack(obj)
        dst = self._leader_index(to)
        self.leaders.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, tag).wait()
        self.leaders.send([data], dst, tag).wait()

    def isend(self, to: str, tag: int, obj: Any) -> "PendingSend":
        """Leader only: like send, but returns at once; wait() on the result before reusing the channel's order
        assumptions (messages of one tag to one leader arrive in the order sent)."""
        data = _pack(obj)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dst = self._leader_index(to)
        return PendingSend([self.leaders.send([size], dst, tag), self.leaders.send([data], dst, tag)], [size, data])

    def recv(self, frm: str, tag: int) -> Any:
        src = self._leader_index(frm)
        n = torch.zeros(1, dtype=torch.int64)
        self.leaders.recv([n], src, tag).wait()
        data = torch.empty(int(n.item()), dtype=torch.uint8)
        self.leaders.recv([data], src, tag).wait()
        return _unpack(data)

    # -- block to block, called on every rank of the block ---------------------------------------------------
    def tell(self, to: list[str], tag: int, obj: Any) -> None:
        """Every rank calls; the leader sends `obj` to each of the `to` partitions' leaders."""
        if self.is_leader:
            for name in to:
                self.send(name, tag, obj)

    def hear(self, frm: str, tag: int) -> Any:
        """Every rank calls; partition `frm`'s message (sent to this leader) on every rank of this block."""
        return self.broadcast(self.recv(frm, tag) if self.is_leader else None)

    def vote(self, other: str, tag: int, mine: bool, send_first: bool) -> bool:
        """Every rank calls: this block's and block `other`'s flags or-ed, on every rank (exactly one of the two
        sends first: gloo sends return once received)."""
        if self.is_leader:
            if send_first:
                self.send(other, tag, mine)
            theirs = bool(self.recv(other, tag))
            if not send_first:
                self.send(other, tag, mine)
            mine = mine or theirs
        return bool(self.broadcast(mine))

    # -- inside the block (the default group) -------------------------------------------------------------
    def broadcast(self, obj: Any = None) -> Any:
        """The leader's `obj` on every rank of this block."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in block-rank order, on the leader; None elsewhere."""
        out = [None] * dist.get_world_size() if self.is_leader else None
        dist.gather_object(obj, out, dst=0)
        return out

    def job_barrier(self) -> None:
        """Every rank of every block: the block's ranks, then the leaders, then the block again. A job must not
        let one partition exit while another still works (launchers kill the rest on the first non-zero
        exit, e.g. 17 after a preemption save)."""
        dist.barrier()
        if self.is_leader:
            self.leaders.barrier(dist.BarrierOptions()).wait()
        dist.barrier()

    # -- rank j <-> rank j of another block of the same size ------------------------------------------------
    def pair(self, other: str):
        """gloo group {this block's rank j, block `other`'s rank j}; this side is rank 0 iff its block comes
        first. Both sides must call it (construction is a rendezvous)."""
        if other not in self._pairs:
            mine, theirs = self.block, next(b for b in self.blocks if b.name == other)
            if mine.size != theirs.size:
                raise ValueError(f"partitions {mine.name} ({mine.size} ranks) and {other} ({theirs.size}) differ "
                                 "in size: no rank-to-rank pairing")
            first, second = sorted((mine.name, other), key=self._leader_index)
            prefix = f"hcx/pair/{first}/{second}/{self.local_rank}"
            self._pairs[other] = dist.ProcessGroupGloo(dist.PrefixStore(prefix, self.store),
                                                       0 if mine.name == first else 1, 2, self.timeout)
        return self._pairs[other]


@dataclass
class PendingSend:
    works: list
    buffers: list  # must stay alive until the sends complete

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def _pack(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unpack(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


def _store(env: DistEnv, timeout: datetime.timedelta):
    # torchrun's agent already serves a store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE); srun/mpirun jobs
    # have none, and global rank 0 starts it, as torch's own tcp:// rendezvous does.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=(env.rank == 0 and not agent), timeout=timeout)


def init_partitions(env: DistEnv, blocks: list[Block], backend: str,
                    timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Partition:
    """Make this block's ranks the default group and join the leaders' bridge. Call before anything else
    initialises torch.distributed (hcx_megatron.distributed.initialize then finds it initialised)."""
    if sum(b.size for b in blocks) != env.world_size:
        raise ValueError(f"partitions cover {sum(b.size for b in blocks)} ranks, the job has {env.world_size}")
    if dist.is_initialized():
        raise RuntimeError("init_partitions must run before torch.distributed is initialised")
    store = _store(env, timeout)
    block = block_of(blocks, env.rank)
    if backend == "nccl":  # bind this rank's GPU before its communicators exist
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"hcx/partition/{block.name}", store),
                            rank=env.rank - block.start, world_size=block.size, timeout=timeout)
    part = Partition(block, blocks, env.rank, store, timeout)
    if part.is_leader:
        index = next(i for i, b in enumerate(blocks) if b is block)
        part.leaders = dist.ProcessGroupGloo(dist.PrefixStore("hcx/leaders", store), index, len(blocks), timeout)
    return part


__all__ = ["Block", "Partition", "layout_blocks", "block_of", "init_partitions"]
