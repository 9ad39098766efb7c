"""Checkpoints: exact resume, resharding across TP/PP, and crash safety while saving (real torchrun runs)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hcx_megatron.training.checkpoint import TRACKER_FILE, checkpoint_dir, read_latest_iteration
from test_overlap_param_gather import OVERLAP, assert_same_tensors
from torchrun_utils import REPO, free_port, pretrain, read_metrics

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`


def data_args(tok, prefix):
    return ["--data-path", prefix, "--tokenizer-model", tok, "--split", "98,2,0"]


BASE = ["--model-preset", "hcx-tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "2e-3", "--lr-warmup-iters", "2", "--seed", "7"]


@pytest.mark.timeout(900)
def test_resume_is_exact(tmp_path, tiny_tokenizer_dir, tiny_indexed_dataset):
    """6 steps straight == 3 steps, stop, resume, 3 steps (PP2 x DP2, distributed optimizer, real data). The
    stopped-and-resumed run also overlaps the grad reduce and the param gather: its checkpoints after steps 2, 4
    and 6 (the save after step 2 is followed by more training, so the forward after a forced gather is covered)
    are bitwise those of the plain straight run, as are its losses (test_overlap_param_gather.py, PP2 x DP2)."""
    args = [*BASE, *data_args(tiny_tokenizer_dir, tiny_indexed_dataset), "--train-iters", "6",
            "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--eval-interval", "3",
            "--save-interval", "2"]
    straight, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    straight_ckpt, ckpt = tmp_path / "straight_ckpt", tmp_path / "ckpt"
    pretrain([*args, "--metrics-jsonl", str(straight), "--save", str(straight_ckpt)], nproc=4)
    pretrain([*args, *OVERLAP, "--metrics-jsonl", str(resumed), "--save", str(ckpt), "--load", str(ckpt),
              "--exit-interval", "3"], nproc=4)
    assert read_latest_iteration(str(ckpt)) == 3
    pretrain([*args, *OVERLAP, "--metrics-jsonl", str(resumed), "--save", str(ckpt), "--load", str(ckpt)], nproc=4)
    a, b = read_metrics(str(straight)), read_metrics(str(resumed))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert abs(x["lm_loss"] - y["lm_loss"]) <= 1e-6 * abs(x["lm_loss"]), (x, y)
        assert abs(x["lr"] - y["lr"]) <= 1e-12
    assert [r["lm_loss"] for r in b] == [r["lm_loss"] for r in a]  # overlap: bitwise
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert a[-1]["lm_loss"] < a[0]["lm_loss"]
    for it in (2, 4, 6):
        assert_same_tensors(checkpoint_dir(str(straight_ckpt), it), checkpoint_dir(str(ckpt), it))
    ev_a = read_metrics(str(straight), kind="eval")
    ev_b = read_metrics(str(resumed), kind="eval")
    assert [e["lm_loss"] for e in ev_a] == pytest.approx([e["lm_loss"] for e in ev_b], rel=1e-6)
    events = [e["event"] for e in read_metrics(str(resumed), kind="event")]
    assert events.count("load") == 1 and "save" in events


@pytest.mark.timeout(900)
def test_reshard_tp2pp2_to_tp1pp1_and_uneven_tp1pp2(tmp_path):
    args = [*BASE, "--mock-data", "--use-distributed-optimizer"]
    ckpt = tmp_path / "ckpt"
    cont = tmp_path / "cont.jsonl"
    pretrain([*args, "--train-iters", "3", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--save", str(ckpt)], nproc=4)
    # The continuing run: same layout, resumes at 3 and runs steps 4-5.
    pretrain([*args, "--train-iters", "5", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--load", str(ckpt), "--metrics-jsonl", str(cont)], nproc=4)
    ref = read_metrics(str(cont))
    assert [r["iteration"] for r in ref] == [4, 5]
    # TP1xPP2 with uneven stages (layers 0-2 | 3): the even TP2xPP2 checkpoint reshards by global layer index.
    for tp, pp, uneven in ((1, 1, []), (1, 2, ["--decoder-first-pipeline-num-layers", "3"])):
        out = tmp_path / f"tp{tp}pp{pp}.jsonl"
        pretrain([*args, "--train-iters", "5", "--tensor-model-parallel-size", str(tp),
                  "--pipeline-model-parallel-size", str(pp), "--load", str(ckpt), "--metrics-jsonl", str(out),
                  *uneven], nproc=tp * pp)
        got = read_metrics(str(out))
        assert [r["iteration"] for r in got] == [4, 5]
        # First step after loading: a forward pass of the loaded weights on the same batch.
        assert got[0]["lm_loss"] == pytest.approx(ref[0]["lm_loss"], rel=1e-5)
        # Second step: also proves the Adam moments and scheduler resharded (fully_reshardable optimizer state).
        assert got[1]["lm_loss"] == pytest.approx(ref[1]["lm_loss"], rel=1e-4)
        assert got[0]["lr"] == pytest.approx(ref[0]["lr"], rel=1e-9)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every worker (torchrun starts workers in their own sessions, so killing its process
    group alone would leave them running)."""
    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.timeout(900)
def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "hcx_megatron.pretrain", "--device", "cpu", "--mock-data", *BASE, "--train-iters", "200",
           "--tensor-model-parallel-size", "2", "--save", str(ckpt), "--save-interval", "1", "--log-interval", "1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    killed_during = None
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = read_latest_iteration(str(ckpt)) if (ckpt / TRACKER_FILE).exists() else None
            tmps = [d for d in os.listdir(ckpt)] if ckpt.exists() else []
            pending = [d for d in tmps if d.endswith(".tmp")]
            if latest is not None and latest >= 2 and pending:
                kill_tree(proc.pid)
                killed_during = pending[0]
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    assert killed_during, "never caught the run while a save was in progress"
    latest = read_latest_iteration(str(ckpt))
    # The tracker names a complete checkpoint, never the one being written: whatever the kill interrupted is
    # iteration latest+1 (a half-written .tmp, or at most a renamed directory whose tracker update never came).
    assert (ckpt / f"iter_{latest:07d}" / "metadata.json").exists()
    leftovers = sorted(d for d in os.listdir(ckpt) if d.startswith("iter_") and int(d[5:12]) > latest)
    assert leftovers and all(d.startswith(f"iter_{latest + 1:07d}") for d in leftovers), (latest, leftovers)
    out = tmp_path / "resume.jsonl"
    proc = pretrain(["--mock-data", *BASE, "--train-iters", str(latest + 1), "--tensor-model-parallel-size", "2",
              "--save", str(ckpt), "--load", str(ckpt), "--metrics-jsonl", str(out)], nproc=2)
    assert [r["iteration"] for r in read_metrics(str(out))] == [latest + 1], (latest, leftovers, proc.stdout[-3000:])
    assert read_latest_iteration(str(ckpt)) == latest + 1
    assert not any(d.endswith(".tmp") for d in os.listdir(ckpt)), "the stale temp dir was not cleared"


@pytest.mark.timeout(600)
def test_megatron_fsdp_resume_is_exact(tmp_path):
    """Megatron-FSDP at DP2 (fsdp_dtensor format): 4 steps straight == 2 steps, save, resume, 2 steps, loss for
    loss bitwise (sharded weights, Adam moments, scheduler and RNG restored). The refusal between formats:
    tests/test_checkpoint_format.py."""
    args = [*BASE, "--mock-data", "--train-iters", "4", "--use-distributed-optimizer", "--use-megatron-fsdp",
            "--data-parallel-sharding-strategy", "optim_grads_params"]
    straight, resumed, ckpt = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "ckpt"
    pretrain([*args, "--metrics-jsonl", str(straight)], nproc=2)
    pretrain([*args, "--metrics-jsonl", str(resumed), "--save", str(ckpt), "--exit-interval", "2"], nproc=2)
    assert read_latest_iteration(str(ckpt)) == 2
    pretrain([*args, "--metrics-jsonl", str(resumed), "--load", str(ckpt)], nproc=2)
    a, b = read_metrics(str(straight)), read_metrics(str(resumed))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert [(r["lm_loss"], r["lr"]) for r in a] == [(r["lm_loss"], r["lr"]) for r in b]
    assert a[-1]["lm_loss"] < a[0]["lm_loss"]
