"""Keep the preemption signal for the driver's main process only.

Slurm delivers a step signal (`srun` forwarding SIGUSR1, `scancel --signal=USR1 J.S`, `--signal=USR1@N`)
to EVERY process of the step, not just the task: helper processes the driver starts get it too. A
helper started by spawn/exec (megatron-core's dist_checkpointing starts a multiprocessing Manager with
the spawn context while saving) has the default SIGUSR1 action, so it dies, and the very checkpoint
the preemption asked for fails. Seen on the single-node test cluster: EOFError from Manager().start().

Fix without touching the driver: block SIGUSR1 in the main thread before the driver runs, and leave
it unblocked in one idle daemon thread created first. The kernel then delivers the process-directed
signal to that thread, CPython's C handler records it, and the main thread runs the driver's Python
handler as usual. Every thread and child process created later inherits the blocked mask (it
survives fork and exec), so children keep the signal pending and harmless.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable

_sink: threading.Thread | None = None


def route_to_main_process(signals: Iterable[int] = (signal.SIGUSR1,)) -> threading.Thread:
    """Idempotent. Call from the main thread before the driver starts threads or processes."""
    global _sink
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("route_to_main_process must be called from the main thread")
    if _sink is not None:
        return _sink
    sigs = set(signals)
    # Created while the signals are still unblocked, so this thread's mask leaves them deliverable.
    _sink = threading.Thread(target=threading.Event().wait, name="hcx-signal-sink", daemon=True)
    _sink.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    return _sink
