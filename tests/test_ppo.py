"""PPO end to end with real torchrun processes on CPU (2 ranks, data parallel), tiny models.

- reward rises by a stated margin within a bounded number of PPO iterations while KL to the reference stays
  below a stated bound (rule reward: share of response tokens with ids 10..19, ~0.16 for the start policy);
- a run preempted in the middle of a PPO iteration and resumed reproduces the uninterrupted run exactly;
- the actor checkpoint holds exactly the tensors of a pretraining checkpoint and the conversion tool exports it;
- unlikelihood on lowers the repetition metric versus off, from an actor pretrained to repeat its last token;
- async rollouts run with the stated staleness bound.
"""

from __future__ import annotations

import json
import os

import pytest

from hcx_megatron.rlhf.synthetic import write_repetitive_indexed_dataset
from ppo_helpers import ppo_args, records, run_ppo
from torchrun_utils import torchrun

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REWARD_MARGIN = 0.06  # mean reward of the last 2 of 10 PPO iterations minus that of the first
KL_BOUND = 3.0  # nats, sum over the response, mean over sequences, at every iteration


@pytest.mark.timeout(600)
def test_ppo_reward_rises_kl_bounded_and_resumes_exactly(ppo_small_vocab):
    root, sft, prompts = ppo_small_vocab
    full, metrics = str(root / "full"), str(root / "full.jsonl")
    proc = run_ppo(2, ppo_args(sft, prompts, [
        "--save", full, "--metrics-jsonl", metrics]), timeout=400)
    assert "on the same 2 ranks" in proc.stdout  # stated placement
    ppo = records(metrics, "ppo")
    assert [r["rollout"] for r in ppo] == list(range(1, 11))
    rewards = [r["reward_mean"] for r in ppo]
    assert (rewards[-1] + rewards[-2]) / 2 >= rewards[0] + REWARD_MARGIN, rewards
    assert max(r["kl"] for r in ppo) < KL_BOUND, [r["kl"] for r in ppo]
    for key in ("entropy", "clip_frac", "value_loss", "value_clip_frac", "response_length", "repetition",
                "rollout_tokens_per_sec", "train_tokens_per_sec", "kl_coef", "staleness"):
        assert all(key in r for r in ppo), key
    assert all(r["staleness"] == 0 for r in ppo) and ppo[0]["kl_coef"] == 0.04
    assert ppo[-1]["value_loss"] < ppo[0]["value_loss"]  # the critic learns
    first = records(metrics, "train")[0]
    assert first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0  # ratio exactly 1 at the first step

    # The actor checkpoint has exactly the tensors of a pretraining checkpoint; the critic sits beside it.
    from megatron.core import dist_checkpointing

    actor_keys = set(dist_checkpointing.load_tensors_metadata(os.path.join(full, "iter_0000040")))
    sft_keys = set(dist_checkpointing.load_tensors_metadata(os.path.join(sft, "iter_0000003")))
    model_keys = lambda ks: {k for k in ks if not k.startswith("optimizer")}  # noqa: E731
    assert model_keys(actor_keys) == model_keys(sft_keys)
    assert os.path.isfile(os.path.join(full, "critic", "iter_0000040", "metadata.json"))
    # ... and the conversion tool exports it.
    import subprocess
    import sys

    hf = str(root / "actor_hf")
    proc = subprocess.run([sys.executable, "-m", "hcx_megatron.convert.cli", "to-hf", "--load", full, "--save", hf],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(hf, "config.json"))

    # Preempted in the middle of PPO iteration 2 (4 steps per iteration), resumed, stopped at its end:
    # every step and every rollout record equals the uninterrupted run's.
    part, pm = str(root / "part"), str(root / "part.jsonl")
    run_ppo(2, ppo_args(sft, prompts, [
        "--save", part, "--load", part, "--exit-interval", "6", "--metrics-jsonl", pm]), timeout=300)
    for rank in (0, 1):  # each rank's half-trained rollout, committed inside the checkpoint
        assert os.path.isfile(os.path.join(part, "iter_0000006", f"ppo_rollout_rank_0000{rank}.pt"))
    run_ppo(2, ppo_args(sft, prompts, [
        "--save", part, "--load", part, "--exit-interval", "8", "--metrics-jsonl", pm]), timeout=300)
    a = {r["iteration"]: r for r in records(metrics, "train")}
    b = records(pm, "train")
    assert [r["iteration"] for r in b] == list(range(1, 9))
    for r in b:
        assert r["lm_loss"] == a[r["iteration"]]["lm_loss"], r["iteration"]
    pa = {r["rollout"]: r for r in ppo}
    for r in records(pm, "ppo"):
        assert r["reward_mean"] == pa[r["rollout"]]["reward_mean"]
        assert r["value_loss"] == pytest.approx(pa[r["rollout"]]["value_loss"], rel=1e-9)


@pytest.mark.timeout(300)
def test_ppo_async_rollouts_respect_staleness_bound(ppo_small_vocab):
    root, sft, prompts = ppo_small_vocab
    metrics = str(root / "async.jsonl")
    args = ppo_args(sft, prompts, ["--async-rollouts", "--max-staleness", "1", "--metrics-jsonl", metrics],
                    ppo_rollouts=3)
    proc = run_ppo(2, args, timeout=240)
    assert "async rollouts, max staleness 1" in proc.stdout
    ppo = records(metrics, "ppo")
    assert [r["rollout"] for r in ppo] == [1, 2, 3]
    assert all(0 <= r["staleness"] <= r["max_staleness"] == 1 for r in ppo)
    assert all(r["reward_mean"] == r["reward_mean"] for r in ppo)  # finite (not NaN)


@pytest.mark.timeout(600)
def test_unlikelihood_lowers_repetition(tmp_path, tiny_tokenizer_dir):
    # Repetition-prone actor: pretrained on documents that repeat one token id (100..163).
    data = write_repetitive_indexed_dataset(str(tmp_path / "rep"), 400, 100, 163, 33, seed=0)
    sft = str(tmp_path / "sft")
    torchrun("hcx_megatron.pretrain", [
        "--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir, "--data-path", data, "--split", "100,0,0",
        "--num-layers", "1",
        "--seq-length", "16", "--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", "40",
        "--lr", "5e-3", "--min-lr", "1e-3", "--lr-warmup-iters", "5", "--save", sft, "--log-interval", "100"],
        1, timeout=300)
    prompts = tmp_path / "prompts.jsonl"
    import random

    rng = random.Random(0)
    prompts.write_text("".join(json.dumps({"prompt_ids": [rng.randint(100, 163) for _ in range(4)]}) + "\n"
                               for _ in range(64)))
    reps = {}
    for weight in ("0", "1.0"):
        metrics = str(tmp_path / f"ul{weight}.jsonl")
        run_ppo(2, [
            "--device", "cpu", "--sft-checkpoint", sft, "--tokenizer-model", tiny_tokenizer_dir,
            "--prompt-data", str(prompts), "--rule-reward", "share:100-163", "--rollout-batch-size", "16",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--ppo-epochs", "2", "--ppo-rollouts", "3",
            "--max-new-tokens", "12", "--lr", "5e-4", "--min-lr", "5e-4", "--seq-length", "32",
            "--log-interval", "100", "--unlikelihood-weight", weight, "--metrics-jsonl", metrics], timeout=300)
        reps[weight] = [r["repetition"] for r in records(metrics, "ppo")]
    off, on = reps["0"], reps["1.0"]
    # Repetition-prone start (> 40% of response bigrams repeat; ~0 for a uniform policy), same first rollout.
    assert off[0] > 0.4 and off[0] == on[0]
    # The last two PPO iterations: unlikelihood lowers the share of repeated bigrams by >= 0.05.
    assert sum(on[-2:]) / 2 <= sum(off[-2:]) / 2 - 0.05, (off, on)


@pytest.mark.timeout(300)
def test_ppo_same_result_under_tp_and_pp(ppo_small_vocab):
    """Rollout sampling is seeded per prompt position and the teacher-forced passes run through megatron's
    schedule with vocabulary-parallel log-probs, so TP2 (+SP) and PP2 give the same PPO run."""
    root, sft, prompts = ppo_small_vocab
    out = {}
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"])):
        metrics = str(root / f"{name}.jsonl")
        args = ppo_args(sft, prompts, [*layout, "--metrics-jsonl", metrics], ppo_rollouts=2, rollout_batch_size=8,
                        global_batch_size=8, micro_batch_size=4, max_new_tokens=8)
        run_ppo(2, args, timeout=240)
        out[name] = records(metrics, "ppo")
    assert len(out["tp2"]) == len(out["pp2"]) == 2
    for a, b in zip(out["tp2"], out["pp2"]):
        assert a["reward_mean"] == b["reward_mean"] and a["response_length"] == b["response_length"]
        for key in ("kl", "entropy", "value_loss", "pg_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
