"""A real, private, single-node Slurm cluster for tests: munged + slurmctld + slurmd in a temp dir.

Everything lives under one directory (munge key and socket, slurm.conf, state, spool, logs), the
daemons listen on free ports, and clients find the cluster through SLURM_CONF in `cluster.env`, so
nothing in /etc is touched and several test sessions could run side by side. The daemons run in the
foreground as our own children, and `stop()` ends exactly those pids.

Used by tests/test_slurm*.py through the `slurm_cluster` fixture defined there:

    cluster = SlurmCluster.start(tmp_dir)
    job = cluster.sbatch(["--ntasks=2", "script.sh"], env=...)
    info = cluster.wait_job(job, {"COMPLETED", "FAILED"})
    cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
KILL_WAIT_S = 5
REQUEUE_SETTLE_S = KILL_WAIT_S + 15
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    pass


def _which_all(names: Iterable[str]) -> list[str]:
    """Names not found on PATH (daemons live in /usr/sbin, which a non-login PATH may lack)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [n for n in names if shutil.which(n, path=path) is None]


def _bin(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if not found:
        raise SlurmError(f"{name} not found on PATH or /usr/sbin")
    return found


def unavailable_reason(try_install: bool = True) -> str | None:
    """None when a private Slurm can be started here; else why not (shown as the skip reason).

    When binaries are missing and we are root, first try the project's installer (what `make install`
    runs in CI), so a skip means slurm-wlm really could not be installed.
    """
    missing = _which_all(DAEMONS + CLIENTS)
    if missing and try_install and os.geteuid() == 0 and shutil.which("apt-get"):
        proc = subprocess.run(["bash", str(REPO / "tools" / "install_system_deps.sh")], capture_output=True,
                              text=True, timeout=900)
        missing = _which_all(DAEMONS + CLIENTS)
        if missing:
            return (f"slurm-wlm/munge could not be installed (missing {missing}); installer said: "
                    f"{(proc.stdout + proc.stderr).strip()[-400:]}")
    if missing:
        return (f"slurm-wlm/munge not installed (missing {missing}) and cannot install here "
                f"(needs root and apt-get; run tools/install_system_deps.sh)")
    if os.geteuid() != 0:
        return "a private slurmd must run as root (SlurmdUser=root) to launch job steps"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_scontrol_record(text: str) -> dict[str, str]:
    """`scontrol -o show job J` prints one line of Key=Value pairs; values have no spaces except Command/
    WorkDir paths with spaces, which we do not use."""
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def slurm_conf_text(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    """slurm.conf for one node, no cgroups/systemd/accounting (see shared/notes/slurm-on-one-machine.md)."""
    return "\n".join([
        "ClusterName=hcxtest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        # Keep finished jobs visible to `scontrol show job` long enough for the test to read them.
        "MinJobAge=900",
        f"KillWait={KILL_WAIT_S}",
        "InactiveLimit=0",
        "SlurmdTimeout=300",
        "JobRequeue=1",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        "",
    ])


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    node: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    jobs: list[int] = field(default_factory=list)  # ids we submitted, to clean up after
    _pending_since: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, root: Path, timeout: float = 90.0) -> "SlurmCluster":
        root = Path(root)
        for sub in ("munge", "state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge_socket = root / "munge" / "munge.socket"
        node = socket.gethostname().split(".")[0]
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf_text(root, node, os.cpu_count() or 1, free_port(), free_port(), munge_socket))
        env = dict(os.environ)
        env["SLURM_CONF"] = str(conf)
        # The daemons and the job steps need /usr/sbin on PATH (slurmstepd, scontrol from inside jobs).
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        cluster = cls(root=root, env=env, node=node)
        try:
            cluster._spawn("munged", [_bin("munged"), "--foreground", "--force", f"--socket={munge_socket}",
                                      f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                                      f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"])
            cluster._wait_for(lambda: munge_socket.exists(), timeout, "munged socket")
            cluster._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", str(conf)])
            cluster._wait_for(lambda: cluster._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld ping")
            cluster._spawn("slurmd", [_bin("slurmd"), "-D", "-f", str(conf), "-N", node])
            cluster._wait_for(lambda: cluster._ok(["sinfo", "-h", "-o", "%t"], "idle"), timeout, "node idle")
        except Exception:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _ok(self, argv: list[str], needle: str) -> bool:
        try:
            out = self.run(argv, check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return needle in out

    def _wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if pred():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")) + \
                sorted((self.root / "munge").glob("*.log")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued or running, end our daemons by pid (reverse start order), then
        anything left of their process groups."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.run(["scancel", "--user=root"], check=False, timeout=20)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False, timeout=20).strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        # slurmstepd processes of unfinished jobs are in slurmd's session; a job still running when a
        # test fails would otherwise keep CPU busy after the test.
        for name, p in self.procs.items():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()
        # Whatever is left of our jobs (orphaned helpers) goes too; ids are only ours while this cluster
        # existed, so match them by the private SLURM_CONF as well.
        for jobid in self.jobs:
            for pid in job_processes(jobid, slurm_conf=self.env["SLURM_CONF"]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    # ------------------------------------------------------------------ client helpers
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None) -> str:
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout + proc.stderr

    def sbatch(self, args: list[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        m = re.search(r"^(\d+)", out.strip())
        if not m:
            raise SlurmError(f"sbatch printed no job id: {out}")
        self.jobs.append(int(m.group(1)))
        return int(m.group(1))

    def job(self, jobid: int) -> dict[str, str]:
        return parse_scontrol_record(self.run(["scontrol", "-o", "show", "job", str(jobid)]))

    def wait_job(self, jobid: int, states: set[str], timeout: float = 600,
                 on_poll: Callable[[dict[str, str]], None] | None = None, poll_s: float = 1.0) -> dict[str, str]:
        """Poll until JobState is in `states`; `on_poll` sees every record (e.g. to release requeued jobs)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(jobid)
            if on_poll:
                on_poll(info)
            if info.get("JobState") in states:
                return info
            time.sleep(poll_s)
        raise SlurmError(f"job {jobid} not in {states} after {timeout}s; last record {info}\n{self.logs()}")

    def release_requeued(self, info: dict[str, str]) -> None:
        """A requeued job waits out Slurm's requeue delay (BeginTime ~2 min); tests start it as soon as the
        previous incarnation is gone. Releasing it earlier (node still COMPLETING the old one) let the late
        termination of job J hit the new run's processes, which carry the same job id."""
        if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
            return
        jobid = int(info["JobId"])
        kill_orphans(jobid)
        # Slurm's termination of the previous incarnation can still reach the node a few seconds after the
        # job shows PENDING (seen: SIGTERM to the new run's tasks ~10 s after a crash requeue), so let it
        # settle for KillWait plus a margin. Still far shorter than the ~2 min requeue delay.
        first_seen = self._pending_since.setdefault((jobid, info.get("Restarts")), time.monotonic())
        if time.monotonic() - first_seen < REQUEUE_SETTLE_S:
            return
        if job_processes(jobid) or "completing" in self.run(["sinfo", "-h", "-o", "%T"], check=False).lower():
            return
        self.run(["scontrol", "update", f"jobid={info['JobId']}", "StartTime=now"], check=False)


def kill_orphans(jobid: int) -> list[int]:
    """SIGKILL processes of our job `jobid` whose parent is not in the job (helpers of a killed rank, e.g.
    dist_checkpointing's multiprocessing Manager): proctrack/linuxproc cannot find them any more, so they
    would outlive the job. Only processes carrying this cluster's job id are touched."""
    killed = []
    members = set(job_processes(jobid))
    for pid in members:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid not in members:  # reparented to init (or a subreaper): no longer in the job's tree
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return killed


def job_processes(jobid: int, slurm_conf: str | None = None) -> list[int]:
    """Pids of processes that belong to Slurm job `jobid` on this machine: its slurmstepd daemons and every
    process whose environment carries SLURM_JOB_ID=jobid (and SLURM_CONF=slurm_conf when given)."""
    pids = []
    want = f"SLURM_JOB_ID={jobid}".encode()
    conf = f"SLURM_CONF={slurm_conf}".encode() if slurm_conf else None
    stepd = f"slurmstepd: [{jobid}.".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (d / "cmdline").read_bytes().startswith(stepd) and conf is None:
                pids.append(int(d.name))
                continue
            env = (d / "environ").read_bytes().split(b"\0")
            if want in env and (conf is None or conf in env):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids
