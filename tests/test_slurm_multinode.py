"""`sbatch --nodes=2 slurm/pretrain_hcx_l.sh` on a real 2-node Slurm cluster whose nodes are network
namespaces of this machine (tests/slurm_cluster.py), the pretraining driver in CPU mode, hcx-tiny, TP2 inside
a node and PP2 across the nodes:

- the 2-node job completes with every iteration's loss equal to the same layout on one node with 4 tasks,
  and its rank traffic goes over the nodes' veth addresses, not loopback (every rank's TCP sockets read
  from /proc while it trains);
- preemption across nodes (`scancel --signal=USR1` to every rank of both nodes) -> one checkpoint -> requeue
  -> resume, then a node loss (power cut of node2 while it is saving) -> the job ends, is requeued, resumes
  once the node is back from the last complete checkpoint, and ends exactly where an uninterrupted run ends;
- a SIGSTOPped rank is found by the heartbeat watchdog, which names rank and host and ends the job.

Skips, with the reason, only where slurm-wlm or network namespaces are unavailable (not root).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import (REPO, SUBNET, SlurmCluster, TERMINAL_STATES, free_port, netns_unavailable_reason,
                           node_addr, unavailable_reason)
from test_slurm_jobs import (TINY, attempts, batch_log, checkpoint_iteration, records, step_pids,
                             train_by_iteration, wait_until)

pytestmark = pytest.mark.slurm

TRAIN_ITERS = 12
SAVE_INTERVAL = 3
# TP2 x PP2 (DP1) on 4 ranks: TP inside a node, the pipeline across the two nodes. A 1-minute distributed
# timeout (the smallest --distributed-timeout-minutes) bounds how long survivors wait for a dead peer.
LAYOUT = dict(TINY, TP="2", PP="2", GLOBAL_BATCH="4", TRAIN_ITERS=str(TRAIN_ITERS), SAVE_INTERVAL=str(SAVE_INTERVAL),
              DIST_TIMEOUT_MIN="1")
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30:00"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0", "--time=30:00"]
# Each namespace node declares 4 CPUs so that one node can hold the 4-task reference (Slurm refuses more tasks
# per node than CPUs); on a 2-core machine the two nodes share its cores.
CPUS_PER_NODE = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason() or netns_unavailable_reason()
    if reason:  # `make test` (root) installs Slurm and iproute2: a missing cluster is a failure, not a skip
        pytest.fail(f"no multi-node test cluster: {reason}")
    # A SIGTERM to pytest (a CI timeout) would skip fixture teardown and leave namespaces and daemons behind;
    # as KeyboardInterrupt it unwinds through c.stop().
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        c = SlurmCluster.start(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus_per_node=CPUS_PER_NODE)
        try:
            yield c
        finally:
            c.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def job_env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI")) and k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(LAYOUT)
    # No MASTER_ADDR: launch.run takes the first node of the step (node1) and it must resolve to node1's veth.
    env.update(RUN_DIR=str(run_dir), MASTER_PORT=str(free_port()), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               HCX_REPO=str(REPO))
    env.update(extra)
    return env


def submit(cluster: SlurmCluster, run_dir: Path, alloc: list[str], **extra: str) -> tuple[int, dict[str, str]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = job_env(run_dir, **extra)
    job = cluster.sbatch([*alloc, f"--output={run_dir.parent}/{run_dir.name}-slurm-%j.out", "slurm/pretrain_hcx_l.sh"],
                         env=env, cwd=REPO)
    return job, env


def diagnostics(cluster: SlurmCluster, run_dir: Path, job: int) -> str:
    logs = sorted((run_dir / "logs").glob("train-*.log"))
    tail = logs[-1].read_text(errors="replace")[-5000:] if logs else "(no step log)"
    return f"--- batch log\n{batch_log(run_dir, job)}\n--- step log tail\n{tail}\n--- cluster\n{cluster.logs(1500)}"


def _hex_addr(text: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} address -> (ip, port): "0B4D000A:1F90" -> ("10.77.0.11", 8080); in tcp6 an IPv4-mapped
    address gives the IPv4 form and the unspecified one "::" (IPv4 words are little-endian)."""
    ip, port = text.split(":")
    if len(ip) == 32:
        if ip[:24] == "0000000000000000FFFF0000":
            ip = ip[24:]
        elif int(ip, 16) == 0:
            return "::", int(port, 16)
        else:
            return ip, int(port, 16)
    return ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16)


def tcp_sockets(pid: int) -> set[tuple[str, str, int, str, int]]:
    """(state, local ip, local port, remote ip, remote port) of every ESTABLISHED or LISTEN TCP socket process
    `pid` holds, read from its network namespace's /proc/PID/net/tcp and its fds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states = {"01": "established", "0A": "listen"}
    out = set()
    for table in ("tcp", "tcp6"):  # a dual-stack listener (the TCPStore's) is in tcp6
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) > 9 and f[3] in states and f[9] in inodes:
                out.add((states[f[3]], *_hex_addr(f[1]), *_hex_addr(f[2])))
    return out


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """The reference: the 2-node job, uninterrupted; while it trains, every rank's TCP peers are read."""
    run_dir = tmp_path_factory.mktemp("runs") / "two_nodes"
    job, env = submit(cluster, run_dir, TWO_NODES)
    peers: dict[int, set] = {}

    def sample(info):
        if info.get("JobState") != "RUNNING" or max(train_by_iteration(run_dir), default=0) < 2:
            return
        for rank in range(4):
            for pid in step_pids(job, rank):
                try:
                    peers.setdefault(rank, set()).update(tcp_sockets(pid))
                except OSError:
                    pass

    t0 = time.monotonic()
    info = cluster.wait_job(job, TERMINAL_STATES, timeout=900, on_poll=sample)
    wall = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED", f"{info}\n{diagnostics(cluster, run_dir, job)}"
    return run_dir, job, info, peers, int(env["MASTER_PORT"]), wall


@pytest.mark.timeout(1800)
def test_two_nodes_tp2_pp2_match_one_node_and_talk_over_veth(cluster, two_node_run, tmp_path_factory):
    run_dir, job, info, peers, master_port, wall = two_node_run
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2" and info["Restarts"] == "0"
    out = batch_log(run_dir, job)
    print(f"2-node job wall {wall:.0f} s")

    # Rank traffic. The job ran at all only because the rendezvous went over the subnet: MASTER_ADDR=node1 (the
    # first node of the step, resolved by the namespace's hosts file), and node2's loopback has no TCPStore.
    # Rank 0 listens on MASTER_PORT (the TCPStore); every established connection of every rank is between test
    # subnet addresses, none over loopback; node2's ranks hold gloo pairs to node1's veth address.
    node1, node2 = node_addr(0), node_addr(1)
    assert set(peers) == {0, 1, 2, 3}, f"no socket sample for some ranks: {sorted(peers)}\n{out}"
    assert any(s[0] == "listen" and s[2] == master_port for s in peers[0]), sorted(peers[0])
    for rank, socks in peers.items():
        conns = [s[1:] for s in socks if s[0] == "established"]
        assert conns, f"rank {rank} had no established TCP connection"
        assert all(c[0].startswith(SUBNET + ".") and c[2].startswith(SUBNET + ".") for c in conns), (rank, conns)
        assert all(c[0] == (node1 if rank < 2 else node2) for c in conns), (rank, conns)  # block distribution
        other = node2 if rank < 2 else node1
        assert any(c[2] == other for c in conns), f"rank {rank}: no connection to the other node {other}"

    # The same layout on one node with 4 tasks: every iteration's loss and lr equal.
    ref_dir = tmp_path_factory.mktemp("runs") / "one_node"
    ref_job, _ = submit(cluster, ref_dir, ONE_NODE)
    ref_info = cluster.wait_job(ref_job, TERMINAL_STATES, timeout=900)
    assert ref_info["JobState"] == "COMPLETED", f"{ref_info}\n{diagnostics(cluster, ref_dir, ref_job)}"
    assert ref_info["NodeList"] in cluster.nodes
    ref, got = train_by_iteration(ref_dir), train_by_iteration(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, TRAIN_ITERS + 1))
    for it in range(1, TRAIN_ITERS + 1):
        assert got[it]["lm_loss"] == pytest.approx(ref[it]["lm_loss"], abs=1e-6), f"iteration {it}"
        assert got[it]["lr"] == pytest.approx(ref[it]["lr"], rel=1e-9), f"iteration {it}"
    assert checkpoint_iteration(run_dir) == TRAIN_ITERS


def load_events(run_dir: Path) -> list[int]:
    return [r["iteration"] for r in records(run_dir) if r.get("event") == "load"]


def saving_iteration(run_dir: Path) -> int | None:
    """The iteration of a checkpoint being written right now (its .tmp directory exists), else None."""
    tmps = sorted((run_dir / "checkpoints").glob("iter_*.tmp"))
    return int(tmps[-1].name[5:12]) if tmps else None


@pytest.mark.timeout(2400)
def test_preempt_across_nodes_then_node_loss_resume_exactly(cluster, two_node_run, tmp_path_factory):
    ref_dir = two_node_run[0]
    run_dir = tmp_path_factory.mktemp("runs") / "preempt_node_loss"
    job, _ = submit(cluster, run_dir, TWO_NODES)
    try:
        # 1) Preemption: USR1 to every task of the job's steps on both nodes (not via the batch shell).
        wait_until(lambda: max(train_by_iteration(run_dir), default=0) >= 2, 600, "iteration 2 of the first run")
        cluster.run(["scancel", "--signal=USR1", str(job)])

        # 2) The requeued run resumes; when it is writing a checkpoint past the preemption one, node2 loses power.
        last_query = [0.0, {}]

        def resumed_and_saving():
            # The job record (an scontrol call) once a second; the checkpoint dir at every poll, so a save of a
            # fraction of a second is still seen.
            if time.monotonic() - last_query[0] > 1:
                info = cluster.job(job)
                cluster.release_requeued(info)
                last_query[:] = [time.monotonic(), info]
            info = last_query[1]
            a = attempts(run_dir)
            if len(a) > 1 or (a and a[0]["decision"] != "requeue") or info.get("JobState") in TERMINAL_STATES:
                raise AssertionError(f"unexpected attempts {a}, job {info.get('JobState')}\n"
                                     f"{diagnostics(cluster, run_dir, job)}")
            if not a or info.get("JobState") != "RUNNING":
                return None
            saving, done = saving_iteration(run_dir), checkpoint_iteration(run_dir)
            return (saving, done) if saving is not None and saving > done > 0 else None

        saving, tracker_at_death = wait_until(resumed_and_saving, 900, "a checkpoint save in the resumed run",
                                              poll=0.02)
        cut = time.monotonic()
        cluster.kill_node("node2")
        # The job must end on its own (Slurm marks node2 DOWN after SlurmdTimeout and requeues the job; the
        # survivors' gloo timeout is the backstop), not hang until its time limit.
        wait_until(lambda: cluster.job(job).get("JobState") != "RUNNING", 300, "the job to end after the node loss",
                   poll=1)
        ended_after = time.monotonic() - cut
        lost = cluster.job(job)
        down = cluster.node_state("node2")
        cluster.restore_node("node2")
        info = cluster.wait_job(job, TERMINAL_STATES, timeout=900, on_poll=cluster.release_requeued)
    except BaseException:
        print(diagnostics(cluster, run_dir, job))
        raise
    print(f"node loss: job left RUNNING {ended_after:.0f} s after the power cut ({lost.get('JobState')}, "
          f"reason {lost.get('Reason')}, node2 {down})")
    assert info["JobState"] == "COMPLETED", f"{info}\n{diagnostics(cluster, run_dir, job)}"
    assert info["Restarts"] == "2"
    assert "down" in down, f"Slurm did not mark node2 down: {down}"

    runs = attempts(run_dir)
    first = runs[0]
    assert first["decision"] == "requeue" and first["rc"] == 17 and first["signalled"] == 0, runs
    # Every rank on both nodes saved and exited 17 after the same agreed iteration: one checkpoint.
    m = re.search(r"ranks ([\d ]+)saved and exited 17", batch_log(run_dir, job))
    assert m and sorted(map(int, m.group(1).split())) == [0, 1, 2, 3], batch_log(run_dir, job)
    events = [r for r in records(run_dir) if r.get("kind") == "event"]
    preempted = [e["iteration"] for e in events if e.get("event") == "preempted"]
    assert preempted == [first["ckpt_after"]] and (run_dir / "checkpoints" / f"iter_{preempted[0]:07d}").is_dir()

    # The resumes: from the preemption checkpoint, then from the last complete one before the power cut, never
    # from the checkpoint that was being written when node2 died.
    loads = load_events(run_dir)
    assert loads == [first["ckpt_after"], tracker_at_death], (loads, saving)
    assert saving > tracker_at_death

    ref, got = train_by_iteration(ref_dir), train_by_iteration(run_dir)
    assert max(got) == TRAIN_ITERS and checkpoint_iteration(run_dir) == TRAIN_ITERS
    for it in range(1, TRAIN_ITERS + 1):
        assert got[it]["lm_loss"] == pytest.approx(ref[it]["lm_loss"], abs=1e-6), f"iteration {it}"
        assert got[it]["lr"] == pytest.approx(ref[it]["lr"], rel=1e-9), f"iteration {it}"


HANG_TIMEOUT_S = 30


@pytest.mark.timeout(900)
def test_stopped_rank_is_named_and_the_job_fails(cluster, tmp_path_factory):
    """SIGSTOP one rank on node2: the watchdog names it (rank and host) within HANG_TIMEOUT_S and kills the
    step; the job does not hold its nodes until the time limit or the (here 10-minute) distributed timeout."""
    run_dir = tmp_path_factory.mktemp("runs") / "hang"
    job, _ = submit(cluster, run_dir, TWO_NODES, TRAIN_ITERS="500", SAVE_INTERVAL="1000", MAX_FAILURES="1",
                    DIST_TIMEOUT_MIN="10", HANG_TIMEOUT_S=str(HANG_TIMEOUT_S), HCX_HEARTBEAT_INTERVAL_S="2")
    stopped: list[int] = []
    try:
        wait_until(lambda: max(train_by_iteration(run_dir), default=0) >= 2, 600, "iteration 2")
        stopped = wait_until(lambda: step_pids(job, 3), 60, "rank 3's process")
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        info = cluster.wait_job(job, TERMINAL_STATES, timeout=HANG_TIMEOUT_S + 240)
        took = time.monotonic() - t0
    finally:
        for pid in stopped:  # normally already killed by the watchdog's scancel
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
    out = batch_log(run_dir, job)
    print(f"hang: job ended {took:.0f} s after SIGSTOP (HANG_TIMEOUT_S={HANG_TIMEOUT_S})")
    assert info["JobState"] == "FAILED", f"{info}\n{diagnostics(cluster, run_dir, job)}"
    assert "step killed by the hang watchdog" in out and "rank 3 on node2" in out, out
    assert "process is stopped or its node is gone" in out
    # Detected after the heartbeat timeout, well before the distributed timeout (600 s) would have fired.
    assert HANG_TIMEOUT_S <= took < HANG_TIMEOUT_S + 120
    assert [a["decision"] for a in attempts(run_dir)] == ["stop"]


@pytest.mark.timeout(600)
def test_mpirun_across_the_two_hosts(cluster, tmp_path):
    """The MPI path claims multi-node (docs/slurm.md): mpirun inside the 2-node allocation (OpenMPI starts its
    daemons through srun) puts 2 ranks on each host, mpi4py agrees on node1 as the rendezvous, and all 4 ranks
    join one gloo world and all-reduce."""
    from test_mpi_launch import _mpirun

    mpirun = _mpirun()[0]  # skips, with the reason, where OpenMPI/mpi4py cannot be installed
    script = tmp_path / "mpi.sh"
    script.write_text(f"#!/bin/bash\ncd {REPO}\n"
                      f"{mpirun} --allow-run-as-root -np 4 --map-by ppr:2:node --mca btl self,tcp "
                      f"{sys.executable} -m launch.run -- launch.selftest --timeout-s 120\n")
    env = {k: v for k, v in job_env(tmp_path).items() if k not in ("MASTER_PORT",)}
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/mpi-%j.out", str(script)],
                         env=env, cwd=REPO)
    info = cluster.wait_job(job, TERMINAL_STATES, timeout=500)
    out = (tmp_path / f"mpi-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{out}"
    for rank in range(4):
        assert (f"selftest rank {rank}/4 local {rank % 2} host node{rank // 2 + 1} master node1:" in out
                and out.count("allreduce=6 expected=6") == 4), out
