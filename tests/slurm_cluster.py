"""A real, private Slurm cluster for tests: munged + slurmctld + slurmd in a temp dir; one node on this
machine's own network, or N >= 2 nodes that are network namespaces (`SlurmCluster.start(root, nodes=2)`).

Everything lives under one directory (munge key and socket, slurm.conf, state, spool, logs), the
daemons listen on free ports, and clients find the cluster through SLURM_CONF in `cluster.env`, so
nothing in /etc is touched and several test sessions could run side by side. The daemons run in the
foreground as our own children, and `stop()` ends exactly those pids.

Used by tests/test_slurm*.py through the `slurm_cluster` fixture defined there:

    cluster = SlurmCluster.start(tmp_dir)
    job = cluster.sbatch(["--ntasks=2", "script.sh"], env=...)
    info = cluster.wait_job(job, {"COMPLETED", "FAILED"})
    cluster.stop()

Multi-node (nodes >= 2, root and iproute2 needed): the test creates a namespace `<tag>-ctl` holding a
bridge with 10.77.0.1/24 and slurmctld, and one namespace per node `<tag>-nodeI` with a veth into that
bridge and 10.77.0.(10+I). The subnet exists only inside these namespaces, so the host's routes, ports and
other sessions' clusters are never touched (the fixed addresses and ports cannot collide). Each daemon
runs in a private UTS + mount namespace with the node's hostname and the cluster's hosts file bound over
/etc/hosts (nothing in /etc is written), so names resolve as on a real cluster: MASTER_ADDR=node1 is
node1's veth address and gloo binds to the address its hostname resolves to. munged stays in the root
namespace (a unix socket on the shared filesystem). Test clients (sbatch, scontrol) run in the ctl
namespace. `kill_node` is a power cut (link down, every process in the namespace SIGKILLed) and
`restore_node` brings the link and a fresh slurmd back; `stop()` deletes every namespace it created,
which removes the veths and the bridge with them.
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

from torchrun_utils import free_port  # noqa: F401  (the tests import it from here too)

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


def parse_scontrol_record(text: str) -> dict[str, str]:
    """`scontrol -o show job J` prints one line of Key=Value pairs; values have no spaces except Command/
    WorkDir paths with spaces, which we do not use."""
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


SUBNET = "10.77.0"  # only inside the cluster's namespaces (see the module docstring)
CTLD_HOST = "ctl"
CTLD_PORT, SLURMD_PORT = 6817, 6818  # per namespace, so fixed ports are free by construction
NODE_IF = "hcx0"  # a node's end of its veth pair, same name in every node namespace
BRIDGE = "hcxbr"
# How long slurmctld waits for a silent slurmd before it marks the node DOWN (and fails and requeues its
# jobs) in the multi-node cluster; it pings every SlurmdTimeout/3. Short so the node-loss test is quick, long
# enough that a busy 2-core machine does not lose a live node.
NETNS_SLURMD_TIMEOUT_S = 20


def node_names(n: int) -> list[str]:
    return [f"node{i}" for i in range(1, n + 1)]


def node_addr(index: int) -> str:
    """Address of node `index` (0-based) on the test subnet."""
    return f"{SUBNET}.{11 + index}"


def slurm_conf_text(root: Path, node: str | list[str], cpus: int, ctld_port: int, slurmd_port: int,
                    munge_socket: Path, ctld: tuple[str, str] | None = None, slurmd_timeout: int = 300,
                    config_overrides: bool = False) -> str:
    """slurm.conf, no cgroups/systemd/accounting (see shared/notes/slurm-on-one-machine.md). One node at
    127.0.0.1 (`node` a name), or nodes on the test subnet (`node` a list, `ctld` = (host, addr)), each with
    `cpus` CPUs and per-node spool/log/pid files (%n is the node name)."""
    nodes = [node] if isinstance(node, str) else list(node)
    multi = not isinstance(node, str)
    ctld_host, ctld_addr = ctld or (nodes[0], "127.0.0.1")
    per_node = "-%n" if multi else ""
    node_lines = [f"NodeName={n} NodeAddr={node_addr(i) if multi else '127.0.0.1'} CPUs={cpus} RealMemory=1000 "
                  f"State=UNKNOWN" for i, n in enumerate(nodes)]
    return "\n".join([
        "ClusterName=hcxtest",
        f"SlurmctldHost={ctld_host}({ctld_addr})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool{per_node}",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd{per_node}.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd{per_node}.log",
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
        f"SlurmdTimeout={slurmd_timeout}",
        # Nodes declaring more CPUs than the machine has would be drained ("Low socket*core*thread count").
        *(["SlurmdParameters=config_overrides"] if config_overrides else []),
        "JobRequeue=1",
        *node_lines,
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        "",
    ])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class NetnsTopology:
    """The namespaces and links of a multi-node cluster. `create` records every namespace it makes before
    configuring it, so `destroy` removes exactly those, also after a half-finished create."""

    tag: str
    nodes: tuple[str, ...]
    created: list[str] = field(default_factory=list)

    @property
    def ctl_ns(self) -> str:
        return f"{self.tag}-ctl"

    def node_ns(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def addr(self, node: str) -> str:
        return node_addr(self.nodes.index(node))

    def bridge_port(self, node: str) -> str:
        """The bridge end of the node's veth pair (in the ctl namespace)."""
        return f"hcxv{self.nodes.index(node) + 1}"

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", f"{SUBNET}.1 {CTLD_HOST}"]
        lines += [f"{self.addr(n)} {n}" for n in self.nodes]
        return "\n".join(lines) + "\n"

    def create(self) -> None:
        existing = set(_ip("netns", "list").stdout.split())
        for ns in [self.ctl_ns, *map(self.node_ns, self.nodes)]:
            if ns in existing:
                raise SlurmError(f"network namespace {ns} already exists; not touching what we did not create")
        ctl = self.ctl_ns
        _ip("netns", "add", ctl)
        self.created.append(ctl)
        _ip("-n", ctl, "link", "set", "lo", "up")
        _ip("-n", ctl, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", ctl, "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("-n", ctl, "link", "set", BRIDGE, "up")
        for node in self.nodes:
            ns, port = self.node_ns(node), self.bridge_port(node)
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ctl, "link", "add", port, "type", "veth", "peer", "name", NODE_IF, "netns", ns)
            _ip("-n", ctl, "link", "set", port, "master", BRIDGE)
            _ip("-n", ctl, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", NODE_IF)
            _ip("-n", ns, "link", "set", NODE_IF, "up")

    def pids(self, ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(x) for x in out.split() if x.isdigit() and int(x) != os.getpid()]

    def kill_all(self, ns: str, timeout: float = 20) -> None:
        """SIGKILL every process in namespace `ns` until none is left (a dying step may still fork)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids(ns)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)
        raise SlurmError(f"processes left in {ns} after {timeout}s: {self.pids(ns)}")

    def destroy(self) -> None:
        """Kill what runs in our namespaces and delete them (their veths and the bridge go with them)."""
        for ns in reversed(self.created):
            try:
                self.kill_all(ns)
            except SlurmError:
                pass
            _ip("netns", "del", ns, check=False)
        self.created.clear()


def netns_unavailable_reason(try_install: bool = True) -> str | None:
    """None when network namespaces with veths and a bridge can be made here (root + iproute2); like
    `unavailable_reason`, first tries the project's installer."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = _which_all(("ip", "unshare", "nsenter"))
    if missing and try_install and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "tools" / "install_system_deps.sh")], capture_output=True, timeout=900)
        missing = _which_all(("ip", "unshare", "nsenter"))
    if missing:
        return f"{missing} not installed (iproute2, util-linux); run tools/install_system_deps.sh"
    return None


# Runs a daemon with the node's hostname and the cluster's hosts file; started inside `unshare --uts --mount`,
# so neither the machine's hostname nor its /etc/hosts changes.
IN_NODE_SH = """#!/bin/sh
# in-node.sh HOSTS_FILE HOSTNAME CMD...
set -e
hosts=$1; name=$2; shift 2
hostname "$name"
mount --bind "$hosts" /etc/hosts
exec "$@"
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    node: str  # the first node (the batch host of a 1-node job)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    jobs: list[int] = field(default_factory=list)  # ids we submitted, to clean up after
    _pending_since: dict = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    net: NetnsTopology | None = None

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, root: Path, timeout: float = 90.0, nodes: int = 1, cpus_per_node: int | None = None) -> "SlurmCluster":
        """`cpus_per_node` (multi-node): the CPUs each node declares; default the machine's CPUs split between
        the nodes. Slurm refuses --ntasks-per-node above a node's CPUs (also with --overcommit), so a test that
        needs more ranks per node declares more CPUs than the machine has (the nodes then share its cores)."""
        root = Path(root)
        for sub in ("munge", "state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge_socket = root / "munge" / "munge.socket"
        conf = root / "slurm.conf"
        net = None
        if nodes == 1:
            names = [socket.gethostname().split(".")[0]]
            conf.write_text(slurm_conf_text(root, names[0], os.cpu_count() or 1, free_port(), free_port(),
                                            munge_socket))
        else:
            names = node_names(nodes)
            # Unique per test session; `ip netns` names are machine-wide.
            net = NetnsTopology(tag=f"hcx{os.getpid()}{os.urandom(2).hex()}", nodes=tuple(names))
            cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
            conf.write_text(slurm_conf_text(root, names, cpus, CTLD_PORT, SLURMD_PORT, munge_socket,
                                            ctld=(CTLD_HOST, f"{SUBNET}.1"), slurmd_timeout=NETNS_SLURMD_TIMEOUT_S,
                                            config_overrides=cpus > (os.cpu_count() or 1)))
            (root / "hosts").write_text(net.hosts_file())
            (root / "in-node.sh").write_text(IN_NODE_SH)
            os.chmod(root / "in-node.sh", 0o755)
            for n in names:
                (root / f"spool-{n}").mkdir(exist_ok=True)
        env = dict(os.environ)
        env["SLURM_CONF"] = str(conf)
        # The daemons and the job steps need /usr/sbin on PATH (slurmstepd, scontrol from inside jobs).
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        cluster = cls(root=root, env=env, node=names[0], nodes=names, net=net)
        try:
            cluster._spawn("munged", [_bin("munged"), "--foreground", "--force", f"--socket={munge_socket}",
                                      f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                                      f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"])
            cluster._wait_for(lambda: munge_socket.exists(), timeout, "munged socket")
            if net is not None:
                net.create()
            cluster._spawn("slurmctld", cluster._in_host(CTLD_HOST, [_bin("slurmctld"), "-D", "-i", "-f", str(conf)]))
            cluster._wait_for(lambda: cluster._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld ping")
            for n in names:
                cluster._start_slurmd(n)
            cluster._wait_for(lambda: cluster.idle_nodes() >= set(names), timeout, "nodes idle")
        except Exception:
            cluster.stop()
            raise
        return cluster

    def _in_host(self, host: str, argv: list[str]) -> list[str]:
        """argv as run on `host`: unchanged on the 1-node cluster, else inside the host's namespace."""
        if self.net is None:
            return argv
        ns = self.net.ctl_ns if host == CTLD_HOST else self.net.node_ns(host)
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05
        # refuses to start without it.
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
                str(self.root / "in-node.sh"), str(self.root / "hosts"), host, *argv]

    def _start_slurmd(self, node: str) -> None:
        name = "slurmd" if self.net is None else f"slurmd-{node}"
        self._spawn(name, self._in_host(node, [_bin("slurmd"), "-D", "-f", self.env["SLURM_CONF"], "-N", node]))

    def idle_nodes(self) -> set[str]:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return set()
        return {parts[0] for parts in (line.split() for line in out.splitlines())
                if len(parts) == 2 and parts[1] == "idle"}

    def node_state(self, node: str) -> str:
        return self.run(["sinfo", "-h", "-n", node, "-o", "%t"], check=False, timeout=20).strip()

    def kill_node(self, node: str) -> None:
        """Power cut: the node's link goes down first (no FIN/RST reaches its peers), then every process in
        its namespace (slurmd, slurmstepd, the ranks and their helpers) is SIGKILLed."""
        assert self.net is not None, "kill_node needs the multi-node cluster"
        _ip("-n", self.net.ctl_ns, "link", "set", self.net.bridge_port(node), "down")
        self.net.kill_all(self.net.node_ns(node))
        p = self.procs.pop(f"slurmd-{node}", None)
        if p is not None:
            p.wait(timeout=10)

    def restore_node(self, node: str, timeout: float = 120) -> None:
        """Link up and a fresh slurmd (ReturnToService=2 puts a DOWN node back in service on registration)."""
        assert self.net is not None
        _ip("-n", self.net.ctl_ns, "link", "set", self.net.bridge_port(node), "up")
        self._start_slurmd(node)
        self._wait_for(lambda: node in self.idle_nodes() or "mix" in self.node_state(node)
                       or "alloc" in self.node_state(node), timeout, f"{node} back in service")

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
        if self.net is not None:
            self.net.destroy()
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
        if self.net is not None and self.net.ctl_ns in self.net.created:
            argv = ["ip", "netns", "exec", self.net.ctl_ns, *argv]
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
