"""`python -m launch.run [options] -- MODULE [ARGS...]`: resolve where this process sits in the job, export
RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, then run MODULE as __main__.

Sources, first match wins: torchrun variables, MPI (mpirun; mpi4py broadcasts rank 0's address and a
free port), a Slurm step (srun: SLURM_PROCID etc., master = first node of the step), or a single
process. `--dry-run` prints the resolved rank, hosts and the TP/PP/CP/DP layout the driver's flags
give (validated with the driver's own checks) and exits without starting anything; with `--nodes` and
`--tasks-per-node` it plans a hypothetical allocation on a login node.

The driver runs in this process (runpy), not as a child: srun/mpirun signals (SIGUSR1 for preemption)
reach it directly and its exit code (17 = preempted, saved) is ours. SIGUSR1 is kept away from the
driver's own helper processes (launch/signals.py), which Slurm would otherwise signal and kill too.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Mapping, MutableMapping, Sequence

from hcx_megatron.distributed.env import (
    DistEnv,
    local_world_size_from_env,
    resolve_dist_env,
    torch_env,
)
from launch import layout as layout_mod
from launch import mpi as mpi_mod
from launch import signals as signals_mod


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.run",
        description="Start a driver module under Slurm (srun), mpirun or a single node.",
        usage="python -m launch.run [--dry-run] [--nodes N --tasks-per-node T] [--mpi auto|on|off] "
              "-- MODULE [ARGS...]",
    )
    p.add_argument("--dry-run", action="store_true",
                   help="print resolved ranks, hosts and parallel layout, validate the flags, start nothing")
    p.add_argument("--nodes", type=int, default=None, help="dry run only: plan for N hypothetical nodes")
    p.add_argument("--tasks-per-node", type=int, default=None, help="dry run only: ranks per hypothetical node")
    p.add_argument("--mpi", choices=["auto", "on", "off"], default="auto",
                   help="use mpi4py to agree on the rendezvous address under mpirun (auto: when importable)")
    p.add_argument("--master-port", type=int, default=None, help="override MASTER_PORT")
    p.add_argument("--no-signal-routing", action="store_true",
                   help="let SIGUSR1 reach the driver's child processes too (default: main process only; "
                        "see launch/signals.py)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher options before `--`, driver module and its flags after."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("launch.run: put the driver after `--`, e.g. "
                         "python -m launch.run -- hcx_megatron.pretrain --mock-data")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def resolve(env: MutableMapping[str, str], mpi: str = "auto") -> tuple[DistEnv, int, tuple[str, ...] | None]:
    """DistEnv, local world size and (under MPI) every rank's host. May run an MPI collective, so every
    rank of an mpirun job must call it."""
    hosts = None
    if mpi_mod.in_mpi_job(env) and mpi != "off":
        try:
            import mpi4py  # noqa: F401  # type: ignore[import-not-found]
            have_mpi4py = True
        except ImportError:
            have_mpi4py = False
        if mpi == "on" and not have_mpi4py:
            raise SystemExit("launch.run: --mpi on but mpi4py is not installed (pip install mpi4py)")
        if have_mpi4py:
            rv = mpi_mod.mpi4py_rendezvous(env)
            env["MASTER_ADDR"], env["MASTER_PORT"] = rv.master_addr, str(rv.master_port)
            hosts = rv.hosts
        elif not mpi_mod.single_node_mpi(env) and "MASTER_ADDR" not in env:
            raise SystemExit("launch.run: multi-node mpirun without mpi4py needs MASTER_ADDR (and MASTER_PORT) "
                             "exported to every rank (mpirun -x MASTER_ADDR=host0 ...), or install mpi4py")
    dist = resolve_dist_env(env, use_mpi4py=False)
    return dist, local_world_size_from_env(env), hosts


def dry_run_report(dist: DistEnv, local_ws: int, env: Mapping[str, str], driver: list[str],
                   nodes: int | None, tasks_per_node: int | None, mpi_hosts: tuple[str, ...] | None) -> tuple[str, int]:
    """(text, exit code): the process's own view, and on rank 0 the job-wide layout."""
    planning = nodes is not None or tasks_per_node is not None
    if planning:
        lines = [f"[plan] hypothetical allocation, nothing started; driver={driver[0] if driver else '-'}"]
    else:
        lines = [f"[rank {dist.rank}/{dist.world_size}] source={dist.source} local_rank={dist.local_rank}/{local_ws} "
                 f"master={dist.master_addr}:{dist.master_port} driver={driver[0] if driver else '-'}"]
    if dist.rank != 0:
        return "\n".join(lines), 0
    if planning:
        hosts = layout_mod.simulated_hosts(nodes or 1, tasks_per_node or 1)
    elif mpi_hosts is not None:
        uniq = list(dict.fromkeys(mpi_hosts))
        hosts = layout_mod.JobHosts(tuple(uniq), tuple(mpi_hosts.count(h) for h in uniq))
    else:
        hosts = layout_mod.job_hosts_from_env(env) if dist.source == "slurm" else None
        if hosts is None:
            hosts = layout_mod.JobHosts((dist.master_addr,), (dist.world_size,))
    code = 0
    lay = None
    if driver:
        from hcx_megatron.config.args import ConfigError

        try:
            lay = layout_mod.parallel_layout_from_argv(driver[1:], hosts.world_size)
        except ConfigError as exc:
            lines.append(f"INVALID LAYOUT for {hosts.world_size} ranks: {exc}")
            code = 2
    lines.append(layout_mod.format_layout(hosts, lay))
    return "\n".join(lines), code


def main(argv: Sequence[str] | None = None) -> int:
    own, driver = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if not driver and not args.dry_run:
        raise SystemExit("launch.run: no driver module after `--`")
    if (args.nodes is not None or args.tasks_per_node is not None) and not args.dry_run:
        raise SystemExit("launch.run: --nodes/--tasks-per-node only plan a hypothetical job; add --dry-run")
    env = os.environ
    if args.master_port is not None:
        env["MASTER_PORT"] = str(args.master_port)
    dist, local_ws, mpi_hosts = resolve(env, args.mpi)
    if args.dry_run:
        text, code = dry_run_report(dist, local_ws, env, driver, args.nodes, args.tasks_per_node, mpi_hosts)
        print(text, flush=True)
        return code
    env.update(torch_env(dist, local_ws))
    if not args.no_signal_routing:
        signals_mod.route_to_main_process()
    module, driver_args = driver[0], driver[1:]
    sys.argv = [module, *driver_args]
    # run_name="__main__" runs the module's `if __name__ == "__main__": main()` exactly as `python -m`.
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code == EXIT_CODE_PREEMPTED and mark_preempted(env.get("HCX_PREEMPT_MARKER"), dist.rank):
            # The job script reads the marker. Exiting 0 keeps srun's --kill-on-bad-exit from killing the
            # ranks that are still finishing their own exit (their helper processes would be orphaned).
            raise SystemExit(0) from None
        raise
    return 0


# hcx_megatron.training.signals.EXIT_CODE_PREEMPTED; not imported so the launcher does not load torch early.
EXIT_CODE_PREEMPTED = 17


def mark_preempted(path: str | None, rank: int) -> bool:
    """Leave evidence that the driver saved and exited for preemption; True when written.

    Under slurm/*.sh (HCX_PREEMPT_MARKER set) the task then exits 0 and the script reads the marker: with
    --kill-on-bad-exit, the first rank to exit 17 would make srun kill the others mid-exit, and srun's own
    code would read 143. Without a marker path, or when it cannot be written, the task keeps exit code 17."""
    if not path:
        return False
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{rank}\n")
        return True
    except OSError as exc:  # never turn a clean preemption into a crash, nor into a silent "done"
        print(f"launch.run: cannot write preemption marker {path}: {exc}; exiting {EXIT_CODE_PREEMPTED}",
              file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())
