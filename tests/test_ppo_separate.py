"""PPO with each model on its own rank partition (--placement separate), real torchrun worlds on gloo:

- a 3-rank job (actor | critic | reference, TP1 each) reproduces the colocated 1-rank run exactly, and a 6-rank
  job with a different layout per model (actor TP2 + SP, critic PP2, reference DP2) reproduces it to float
  rounding;
- a save in the middle of a PPO iteration resumes exactly; a signal to the reference partition alone stops the
  whole job at one iteration with both checkpoints written (exit 17 everywhere);
- async rollouts from a rollout partition: staleness exactly min(r, 1), the same run with a TP1 actor and
  rollout partition (shard-to-shard weights) and with a TP2 actor sampling on TP1 (weights resharded through
  dist checkpoints), and a stop in the middle of an iteration drains the rollouts in flight and resumes;
- a trained reward model on its own TP2 partition scores exactly as it does colocated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hcx_megatron.training.metrics import read_metrics
from ppo_helpers import ppo_args, records, run_ppo
from torchrun_utils import free_port

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

SMALL = dict(ppo_rollouts=2, rollout_batch_size=8, global_batch_size=8, micro_batch_size=4, max_new_tokens=8)
COMPARED = ("reward_mean", "kl", "entropy", "value_loss", "pg_loss", "response_length")


def _run(nproc, sft, prompts, metrics, extra, timeout=300, **overrides):
    return run_ppo(nproc, ppo_args(
        sft, prompts, [*extra, "--metrics-jsonl", metrics], **{**SMALL, **overrides}), timeout=timeout)


def _same(a, b, exact):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in COMPARED:
            if exact:
                assert x[key] == y[key], (key, x[key], y[key])
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def separate_run(ppo_small_vocab):
    """3 PPO iterations on 3 ranks (actor | critic | reference), saved: the reference run of this module."""
    root, sft, prompts = ppo_small_vocab
    save, metrics = str(root / "sep_full"), str(root / "sep_full.jsonl")
    proc = _run(3, sft, prompts, metrics, ["--save", save], ppo_rollouts=3)  # auto: 3 ranks hold the 3 models
    return proc, save, metrics


@pytest.mark.timeout(400)
def test_separate_partitions_reproduce_the_colocated_run(ppo_small_vocab, separate_run):
    root, sft, prompts = ppo_small_vocab
    proc, _, sep = separate_run
    colo, het = str(root / "sep_colo.jsonl"), str(root / "sep_het.jsonl")
    assert ("placement: separate partitions: actor rank 0 (TP 1, PP 1, DP 1), critic rank 1 (TP 1, PP 1, DP 1), "
            "reference rank 2 (TP 1, PP 1, DP 1)") in proc.stdout
    assert "[ppo:reference] served 3 rollouts" in proc.stdout
    proc = _run(1, sft, prompts, colo, ["--placement", "colocated"], ppo_rollouts=3)
    assert "on the same 1 ranks" in proc.stdout
    _same(records(colo, "ppo"), records(sep, "ppo"), exact=True)
    assert [r["lm_loss"] for r in records(colo, "train")] == [r["lm_loss"] for r in records(sep, "train")]
    (event,) = [r for r in read_metrics(sep, None) if r.get("event") == "placement"]
    assert set(event["roles"]) == {"actor", "critic", "reference"}
    assert all(r["exchange_seconds"] >= 0 for r in records(sep, "ppo"))

    proc = _run(6, sft, prompts, het, [
        "--placement", "separate", "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--critic-tensor-model-parallel-size", "1", "--critic-pipeline-model-parallel-size", "2",
        "--reference-ranks", "2", "--reference-tensor-model-parallel-size", "1"])
    assert ("actor ranks 0-1 (TP 2, PP 1, DP 1), critic ranks 2-3 (TP 1, PP 2, DP 1), "
            "reference ranks 4-5 (TP 1, PP 1, DP 2)") in proc.stdout
    _same(records(colo, "ppo")[:2], records(het, "ppo"), exact=False)


@pytest.mark.timeout(400)
def test_separate_resume_is_exact_and_a_signal_anywhere_stops_every_partition(ppo_small_vocab, separate_run):
    root, sft, prompts = ppo_small_vocab
    _, full, fm = separate_run
    part, pm = str(root / "sep_part"), str(root / "sep_part.jsonl")
    # Stop after step 3 of 6 (2 steps per iteration: in the middle of iteration 2), resume to the end.
    _run(3, sft, prompts, pm, ["--save", part, "--load", part, "--exit-interval", "3"], ppo_rollouts=3)
    for root_dir in (part, os.path.join(part, "critic")):  # the actor's and the critic's half-trained rollout
        assert os.path.isfile(os.path.join(root_dir, "iter_0000003", "ppo_rollout_rank_00000.pt")), root_dir
    _run(3, sft, prompts, pm, ["--save", part, "--load", part], ppo_rollouts=3)
    a = {r["iteration"]: r["lm_loss"] for r in records(fm, "train")}
    b = records(pm, "train")
    assert [r["iteration"] for r in b] == list(range(1, 7))
    assert all(r["lm_loss"] == a[r["iteration"]] for r in b)
    _same(records(fm, "ppo"), records(pm, "ppo"), exact=True)
    for root_dir in (full, os.path.join(full, "critic")):
        with open(os.path.join(root_dir, "latest_checkpointed_iteration.txt")) as f:
            assert f.read().strip() == "6"

    # SIGUSR1 to the reference partition only (global rank 2): it reports the signal with its next answer, the
    # critic and actor agree on it at their next step, both save at that iteration, every process exits 17.
    pre, prem = str(root / "sep_pre"), str(root / "sep_pre.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", str(free_port()),
           "-m", "hcx_megatron.rlhf.ppo", *ppo_args(sft, prompts, ["--save", pre, "--metrics-jsonl", prem],
                                                    **{**SMALL, "ppo_rollouts": 500})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(prem) and records(prem, "ppo")):
            time.sleep(0.5)
        assert records(prem, "ppo"), "no PPO iteration finished"
        _signal_rank(proc.pid, "2")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    (stop,) = [r for r in read_metrics(prem, None) if r.get("event") == "preempted"]
    # Actor and critic (each its partition's rank 0) both took the preemption exit at the same iteration, the
    # reference was released; the first process to end exited 17. (torchrun then SIGTERMs the others, which
    # may already be in interpreter shutdown with default handlers: after the job-wide barrier, so harmless.
    # Under slurm/*.sh, launch.run's marker carries the 17 instead.)
    saved = f"[hcx] preemption signal: saved at iteration {stop['iteration']}, exiting 17"
    assert out.count(saved) == 2, out[-3000:] + err[-3000:]
    assert "[ppo:reference] served" in out
    assert "Root Cause" in err and "exitcode  : 17" in err.split("Root Cause", 1)[1], err[-3000:]
    for root_dir in (pre, os.path.join(pre, "critic")):
        with open(os.path.join(root_dir, "latest_checkpointed_iteration.txt")) as f:
            assert int(f.read()) == stop["iteration"] < 1000


@pytest.mark.timeout(400)
def test_both_placements_resume_the_critic_from_load(ppo_small_vocab, separate_run):
    """--load A --save B: the critic resumes from A/critic in both placements (with partitions it used to be
    looked for in B/critic and silently started over), so one more PPO iteration from A is the same run."""
    root, sft, prompts = ppo_small_vocab
    _, full, _ = separate_run
    out = {}
    for name, nproc, extra in (("colocated", 1, ["--placement", "colocated"]), ("separate", 3, [])):
        save, metrics = str(root / f"from_load_{name}"), str(root / f"from_load_{name}.jsonl")
        proc = _run(nproc, sft, prompts, metrics, [*extra, "--load", full, "--save", save], ppo_rollouts=4)
        assert f"resume: loaded {os.path.join(full, 'critic', 'iter_0000006')}" in proc.stdout, name
        assert os.path.isfile(os.path.join(save, "critic", "iter_0000008", "metadata.json")), name
        out[name] = records(metrics, "ppo")
    assert [r["rollout"] for r in out["separate"]] == [4]
    _same(out["colocated"], out["separate"], exact=True)


def _signal_rank(launcher_pid: int, rank: str) -> None:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank:
                os.kill(child.pid, signal.SIGUSR1)
                return
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.timeout(500)
def test_async_rollout_partition_under_tp_and_pp_layouts(ppo_small_vocab):
    root, sft, prompts = ppo_small_vocab
    tp1, tp2 = str(root / "async_tp1.jsonl"), str(root / "async_tp2.jsonl")
    flags = ["--placement", "separate", "--async-rollouts", "--max-staleness", "1"]
    proc = _run(4, sft, prompts, tp1, flags, ppo_rollouts=3)
    assert "rollout rank 1 (TP 1, PP 1, DP 1)" in proc.stdout and "async rollouts, max staleness 1" in proc.stdout
    a = records(tp1, "ppo")
    # Rollout r is sampled with the weights after r - 1 rollouts (the initial ones for r = 0, 1): exactly
    # min(r, 1) versions old, never more than --max-staleness.
    assert [r["staleness"] for r in a] == [0, 1, 1] and all(r["max_staleness"] == 1 for r in a)
    assert a[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # rollout 2 was sampled by the reference weights
    assert a[1]["clip_frac"] > 0  # ... and the learner has moved on: the ratio corrects for it
    # The colocated layout restriction is gone: the actor at TP2, sampling on a TP1 rollout partition that loads
    # each weights version resharded from the dist checkpoint the actor writes (removed at the end).
    weights = str(root / "async_weights")
    proc = _run(5, sft, prompts, tp2, [*flags, "--tensor-model-parallel-size", "2",
                                       "--rollout-tensor-model-parallel-size", "1",
                                       "--critic-tensor-model-parallel-size", "1",
                                       "--reference-tensor-model-parallel-size", "1",
                                       "--rollout-weights-dir", weights], ppo_rollouts=3)
    assert "actor ranks 0-1 (TP 2, PP 1, DP 1), rollout rank 2 (TP 1, PP 1, DP 1)" in proc.stdout
    assert not os.path.exists(weights)
    b = records(tp2, "ppo")
    assert [r["staleness"] for r in b] == [0, 1, 1]
    _same(a, b, exact=False)  # the schedule is deterministic, so async runs repeat under any layout

    # Stopped in the middle of iteration 2: the sampler has already sent rollout 3; actor and critic drain it
    # and the job exits 0 instead of hanging. The resumed run finishes within the staleness bound.
    ck, cm = str(root / "async_ck"), str(root / "async_ck.jsonl")
    proc = _run(4, sft, prompts, cm, [*flags, "--save", ck, "--load", ck, "--exit-interval", "3"], ppo_rollouts=3)
    assert "[ppo:reference] served 3 rollouts" in proc.stdout
    proc = _run(4, sft, prompts, cm, [*flags, "--save", ck, "--load", ck], ppo_rollouts=3)
    c = records(cm, "ppo")
    assert [r["rollout"] for r in c] == [1, 2, 3] and all(0 <= r["staleness"] <= 1 for r in c)
    assert [r["iteration"] for r in records(cm, "train")] == list(range(1, 7))


@pytest.mark.timeout(900)
def test_reward_model_partition_scores_as_colocated(trained_reward_model, tmp_path):
    rm = trained_reward_model
    assert rm.proc.returncode == 0, rm.proc.stderr[-3000:]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say something about {w}"}) + "\n"
                               for w in ("cat", "dog", "park", "tree", "sky", "house", "mat", "day")))
    base = ["--device", "cpu", "--sft-checkpoint", rm.sft, "--rm-checkpoint", rm.rm, "--tokenizer-model",
            rm.tokenizer, "--prompt-data", str(prompts), "--rollout-batch-size", "8", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--ppo-epochs", "1", "--ppo-rollouts", "2", "--max-new-tokens", "6",
            "--lr", "1e-4", "--min-lr", "1e-4", "--seq-length", "64", "--log-interval", "100"]
    out = {}
    for name, nproc, extra in (("colocated", 1, ["--placement", "colocated"]),
                               ("separate", 5, ["--placement", "separate", "--reward-ranks", "2",
                                                "--reward-tensor-model-parallel-size", "2"])):
        metrics = str(tmp_path / f"{name}.jsonl")
        proc = run_ppo(nproc, [*base, *extra, "--metrics-jsonl", metrics], timeout=300)
        out[name] = records(metrics, "ppo")
    assert "reward ranks 3-4 (TP 2, PP 1, DP 1)" in proc.stdout
    assert "[ppo:reward] served 2 rollouts" in proc.stdout
    _same(out["colocated"], out["separate"], exact=False)
    assert all(-5.0 <= r["reward_mean"] <= 5.0 for r in out["separate"])  # normalised and clipped
