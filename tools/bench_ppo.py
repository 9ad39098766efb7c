#!/usr/bin/env python
"""PPO placement benchmark: seconds per PPO iteration, generation and training tokens/s, for several placements
of the same run, each as a ratio to the FIRST configuration measured in the same invocation (the baseline).

Each configuration runs the real driver (torchrun -m hcx_megatron.rlhf.ppo) with --metrics-jsonl on a stand-in
SFT model (a few pretraining steps on mock data, made here unless --sft-checkpoint is given) and a rule reward;
the first --warmup PPO iterations are dropped and the median of the rest is reported.

CPU (default): colocated on 1 rank vs actor | critic | reference on 3 ranks vs the same + an async rollout rank:
    python tools/bench_ppo.py
GPU, e.g. 8 GPUs, an HCX-S-shaped layer stack, colocated vs separate partitions:
    python tools/bench_ppo.py --device cuda --extra "--bf16 --num-layers 8 --hidden-size 2048 ..." \
        --configs "colocated:8:--placement colocated --tensor-model-parallel-size 2" \
                  "separate:8:--placement separate --tensor-model-parallel-size 2 --critic-ranks 2 --reference-ranks 2"
A configuration is NAME:PROCESSES:FLAGS.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hcx_megatron.rlhf.synthetic import free_port, write_prompt_ids_jsonl  # noqa: E402

DEFAULT_CONFIGS = ["colocated:1:--placement colocated", "separate:3:--placement separate",
                   "separate-async:4:--placement separate --async-rollouts --max-staleness 1"]


def _torchrun(nproc: int, module: str, args: list[str], verbose: bool) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=None if verbose else subprocess.DEVNULL,
                   stderr=None if verbose else subprocess.DEVNULL)


def make_sft(workdir: str, a: argparse.Namespace) -> str:
    sft = os.path.join(workdir, "sft")
    _torchrun(1, "hcx_megatron.pretrain", [
        "--device", a.device, "--mock-data", "--vocab-size", str(a.vocab_size), "--make-vocab-size-divisible-by",
        str(a.vocab_size), "--num-layers", "2", "--seq-length", str(a.seq_length), "--micro-batch-size", "4",
        "--global-batch-size", "8", "--train-iters", "3", "--save", sft, "--log-interval", "1000",
        *shlex.split(a.extra)], a.verbose)
    return sft


def run_config(spec: str, sft: str, prompts: str, a: argparse.Namespace, workdir: str) -> dict:
    name, nproc, flags = spec.split(":", 2)
    metrics = os.path.join(workdir, f"{name}.jsonl")
    args = ["--device", a.device, "--sft-checkpoint", sft, "--prompt-data", prompts, "--rule-reward", "share:10-19",
            "--rollout-batch-size", str(a.rollout_batch_size), "--global-batch-size", str(a.global_batch_size),
            "--micro-batch-size", str(a.micro_batch_size), "--ppo-epochs", "2", "--ppo-rollouts", str(a.rollouts),
            "--max-new-tokens", str(a.max_new_tokens), "--lr", "1e-4", "--min-lr", "1e-4",
            "--seq-length", str(a.seq_length), "--log-interval", "1000", "--metrics-jsonl", metrics,
            *shlex.split(flags), *shlex.split(a.extra)]
    print(f"[bench] {name} on {nproc} processes: {flags}", flush=True)
    _torchrun(int(nproc), "hcx_megatron.rlhf.ppo", args, a.verbose)
    recs = [json.loads(line) for line in open(metrics) if '"kind": "ppo"' in line]
    steady = recs[a.warmup:] or recs
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    return {"config": name, "processes": int(nproc), "iteration_s": med("iteration_seconds"),
            "rollout_tok_s": med("rollout_tokens_per_sec"), "train_tok_s": med("train_tokens_per_sec"),
            "max_staleness": max(r["staleness"] for r in recs), "final_reward": recs[-1]["reward_mean"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="NAME:PROCESSES:FLAGS, baseline first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sft-checkpoint", default=None, help="default: a stand-in made here")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--extra", default="", help="flags added to every run (model shape, --bf16, ...)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as workdir:
        sft = a.sft_checkpoint or make_sft(workdir, a)
        prompts = os.path.join(workdir, "prompts.jsonl")
        write_prompt_ids_jsonl(prompts, 4 * a.rollout_batch_size, vocab=a.vocab_size - 1, length=4, seed=0)
        results = [run_config(spec, sft, prompts, a, workdir) for spec in a.configs]
    base = results[0]
    print(f"\n{'config':<16}{'procs':>6}{'s/iteration':>13}{'x base':>8}{'gen tok/s':>11}{'train tok/s':>13}"
          f"{'staleness':>11}")
    for r in results:
        r["speedup_vs_baseline"] = base["iteration_s"] / r["iteration_s"]
        print(f"{r['config']:<16}{r['processes']:>6}{r['iteration_s']:>13.3f}{r['speedup_vs_baseline']:>8.2f}"
              f"{r['rollout_tok_s']:>11.0f}{r['train_tok_s']:>13.0f}{r['max_staleness']:>11}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
