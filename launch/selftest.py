"""`python -m launch.run -- launch.selftest`: check a job's wiring before spending GPU hours on it.

Every rank joins torch.distributed (gloo on CPU, nccl with --backend nccl), all-reduces its rank and
prints one line; rank 0 checks the sum is 0+1+...+(N-1). Exit code 0 means rendezvous, rank numbering
and collectives all work for this launcher/allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch.selftest")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout-s", type=int, default=120)
    p.add_argument("--report-jsonl", default=None, help="rank 0 appends one JSON line with what it saw")
    # Unknown flags are ignored so that a job script can swap its driver for this check unchanged
    # (DRIVER=launch.selftest sbatch slurm/pretrain_hcx_l.sh); --device cuda then selects NCCL.
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    if args.device == "cuda":
        args.backend = "nccl"

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = "cpu"
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(args.backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout_s))
    t = torch.tensor([float(rank)], device=device)
    dist.all_reduce(t)
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    expected = world * (world - 1) / 2
    print(f"selftest rank {rank}/{world} local {local_rank} host {socket.gethostname()} "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} allreduce={t.item():.0f} "
          f"expected={expected:.0f}", flush=True)
    ok = t.item() == expected
    if rank == 0 and args.report_jsonl:
        with open(args.report_jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"world_size": world, "allreduce": t.item(), "expected": expected,
                                "hosts": hosts, "ok": ok}) + "\n")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
