"""Per-rank heartbeat files for the launcher's hang watchdog (launch/watchdog.py).

Under the slurm/ job scripts (HCX_HEARTBEAT_DIR set) every rank keeps one small JSON file,
`DIR/rank-00003.json`, with two clocks:

- `alive`: written every HCX_HEARTBEAT_INTERVAL_S (10 s) by a daemon thread. It stops only when the whole
  process stops (SIGSTOP, a dead node, a kernel hang), not when the rank merely waits in a collective
  (the GIL is released there), so a stale `alive` names the rank that is really stuck.
- `progress` + `iteration`: set by `beat(iteration)` after every training step, written with the next
  `alive`. All ranks stale here but alive means a hang inside a collective (deadlock, lost peer).

Without HCX_HEARTBEAT_DIR `beat` does nothing. Writes go through a temp file and os.replace, so the
watchdog never reads half a file; a write that fails (full or flaky shared filesystem) is skipped rather
than failing training.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

ENV_DIR = "HCX_HEARTBEAT_DIR"
ENV_INTERVAL = "HCX_HEARTBEAT_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0


def heartbeat_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank-{rank:05d}.json")


class Heartbeat:
    def __init__(self, directory: str, rank: int, interval_s: float = DEFAULT_INTERVAL_S):
        self.path = heartbeat_path(directory, rank)
        self.interval_s = interval_s
        self.record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                       "job": os.environ.get("SLURM_JOB_ID"), "step": os.environ.get("SLURM_STEP_ID"),
                       "iteration": None, "progress": None, "alive": None}
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._write()
        threading.Thread(target=self._alive_loop, name="hcx-heartbeat", daemon=True).start()

    def beat(self, iteration: int) -> None:
        # Memory only: the thread writes, so a rank costs the (shared) filesystem one small write per interval
        # however fast its steps are.
        with self._lock:
            self.record["iteration"] = iteration
            self.record["progress"] = time.time()

    def _alive_loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self._write()

    def _write(self) -> None:
        with self._lock:
            self.record["alive"] = time.time()
            text = json.dumps(self.record)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            pass


_heartbeat: Heartbeat | None = None


def beat(iteration: int) -> None:
    """After each training step. The first call starts this rank's heartbeat (when HCX_HEARTBEAT_DIR is set)."""
    global _heartbeat
    if _heartbeat is None:
        directory = os.environ.get(ENV_DIR)
        if not directory:
            return
        # RANK: the global rank launch.run exported (also right in a partitioned job, whose default group
        # is only a block of the world).
        _heartbeat = Heartbeat(directory, int(os.environ.get("RANK", "0")),
                               float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S)))
    _heartbeat.beat(iteration)
