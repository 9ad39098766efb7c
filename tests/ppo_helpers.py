"""Helpers of the PPO end-to-end tests (test_ppo.py, test_ppo_separate.py)."""

from __future__ import annotations

from hcx_megatron.training.metrics import read_metrics
from torchrun_utils import torchrun


def run_ppo(nproc: int, args: list[str], timeout: float):
    """The PPO driver on `nproc` CPU processes; fails the test with its output when it exits non-zero."""
    return torchrun("hcx_megatron.rlhf.ppo", args, nproc, timeout=timeout)


def ppo_args(sft: str, prompts: str, extra: list[str], **overrides) -> list[str]:
    """PPO on the vocabulary-64 stand-in SFT model with the rule reward share:10-19; overrides replace flag
    values, e.g. ppo_rollouts=2 -> --ppo-rollouts 2."""
    args = ["--device", "cpu", "--sft-checkpoint", sft, "--prompt-data", prompts, "--rule-reward", "share:10-19",
            "--rollout-batch-size", "32", "--global-batch-size", "16", "--micro-batch-size", "8",
            "--ppo-epochs", "2", "--ppo-rollouts", "10", "--max-new-tokens", "12", "--lr", "3e-4",
            "--min-lr", "3e-4", "--seq-length", "32", "--log-interval", "100", *extra]
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        args[args.index(flag) + 1] = str(value)
    return args


def records(path: str, kind: str) -> list[dict]:
    return read_metrics(path, kind)
