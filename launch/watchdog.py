"""`python -m launch.watchdog`: the hang watchdog the job scripts run next to a training step.

Every rank keeps a heartbeat file (hcx_megatron/training/heartbeat.py): `alive` refreshed by a thread,
`progress` after each step. The watchdog reads them every --poll seconds and, once --timeout passes,
ends the step with a verdict that names rank and host:

- a rank whose `alive` is stale: the process is stopped (SIGSTOP, swapped out, a kernel hang) or its node
  is gone; the other ranks are waiting for it in a collective;
- every rank alive but none finished a step within the timeout: a hang inside a collective.

A rank is judged only once its first heartbeat exists (start-up and checkpoint loading are covered by the
distributed timeout, --distributed-timeout-minutes). The step is killed with `scancel --signal=KILL
JOB.STEP` (SIGKILL also ends stopped processes, on every node), so the allocation is not held until the
time limit; the job script's requeue policy then decides. Stdlib only: no torch import on the batch host.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    message: str
    job: str | None
    step: str | None


def read_heartbeats(directory: str) -> dict[int, dict]:
    beats = {}
    for path in glob.glob(os.path.join(directory, "rank-*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            beats[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now; read again next poll
    return beats


def judge(beats: dict[int, dict], now: float, timeout_s: float, world_size: int) -> Verdict | None:
    """The verdict for these heartbeats at time `now`, or None while everything is within the timeout."""
    if not beats:
        return None
    any_rec = next(iter(beats.values()))
    job, step = any_rec.get("job"), any_rec.get("step")
    stopped = sorted(r for r, rec in beats.items() if now - rec["alive"] > timeout_s)
    if stopped:
        parts = [f"rank {r} on {beats[r]['host']} (pid {beats[r]['pid']}, last iteration {beats[r]['iteration']}) "
                 f"silent for {now - beats[r]['alive']:.0f} s" for r in stopped]
        return Verdict(f"HANG: {'; '.join(parts)}: the process is stopped or its node is gone (heartbeat "
                       f"timeout {timeout_s:.0f} s); the other ranks wait for it", job, step)
    if len(beats) == world_size:
        progress = {r: rec["progress"] for r, rec in beats.items()}
        if all(p is not None and now - p > timeout_s for p in progress.values()):
            lowest = min(beats[r]["iteration"] for r in beats)
            behind = sorted(r for r in beats if beats[r]["iteration"] == lowest)
            where = ", ".join(f"rank {r} on {beats[r]['host']}" for r in behind[:8])
            return Verdict(f"HANG: all {world_size} ranks alive but none finished a step for {timeout_s:.0f} s "
                           f"(a hang inside a collective); lowest iteration {lowest}: {where}", job, step)
    return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_step(verdict: Verdict, step_pid: int | None) -> None:
    if verdict.job and verdict.step:
        subprocess.run(["scancel", "--signal=KILL", f"{verdict.job}.{verdict.step}"], check=False, timeout=60)
    elif step_pid is not None:  # not under Slurm: the launcher process itself
        try:
            os.kill(step_pid, 9)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.watchdog", description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="heartbeat directory (HCX_HEARTBEAT_DIR of the ranks)")
    p.add_argument("--ranks", type=int, required=True, help="world size")
    p.add_argument("--timeout", type=float, required=True, help="seconds without a heartbeat / a step")
    p.add_argument("--poll", type=float, default=None, help="seconds between checks (default timeout/10, <= 10)")
    p.add_argument("--step-pid", type=int, default=None, help="exit quietly once this process (srun) is gone")
    p.add_argument("--report", default=None, help="also write the verdict to this file")
    a = p.parse_args(argv)
    poll = a.poll if a.poll is not None else min(10.0, max(a.timeout / 10, 0.5))
    while _alive(a.step_pid):
        verdict = judge(read_heartbeats(a.dir), time.time(), a.timeout, a.ranks)
        if verdict is not None:
            print(f"[hcx watchdog] {verdict.message}; killing step {verdict.job}.{verdict.step}", flush=True)
            if a.report:
                with open(a.report, "w", encoding="utf-8") as f:
                    f.write(verdict.message + "\n")
            kill_step(verdict, a.step_pid)
            return 3
        time.sleep(poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
