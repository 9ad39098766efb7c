#!/usr/bin/env python
"""Training throughput benchmark: tokens/s, TFLOP/s per GPU and MFU for a preset and a list of layouts.

Each layout runs the real driver (torchrun -m hcx_megatron.pretrain) with --metrics-jsonl; the first
--warmup steps are dropped and the median of the rest is reported, with every layout's per-token time as a
ratio to the FIRST layout measured in the same invocation (the baseline).

CPU (default): TP1 vs TP2xPP2 on 4 processes of hcx-tiny:
    python tools/bench_train.py --layouts 1x1x1 2x2x1
GPU (e.g. an HCX-S-shaped ~1.5B model at seq 4096, bf16, one H100):
    python tools/bench_train.py --device cuda --bf16 --layouts 1x1x1 --seq-length 4096 --micro-batch-size 1 \
        --global-batch-size 8 --extra "--num-layers 16 --hidden-size 2048 --ffn-hidden-size 7168 \
        --num-attention-heads 16 --num-query-groups 4 --model-preset hcx-s"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, a: argparse.Namespace, workdir: str) -> dict:
    tp, pp, dp = (int(x) for x in layout.split("x"))
    metrics = os.path.join(workdir, f"{layout}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp * dp}",
           f"--master-port={free_port()}", "-m", "hcx_megatron.pretrain", "--device", a.device, "--mock-data",
           "--model-preset", a.model_preset, "--tensor-model-parallel-size", str(tp),
           "--pipeline-model-parallel-size", str(pp), "--seq-length", str(a.seq_length),
           "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
           "--train-iters", str(a.steps), "--metrics-jsonl", metrics, "--log-interval", "1000",
           "--peak-tflops", str(a.peak_tflops), *(["--bf16"] if a.bf16 else []), *shlex.split(a.extra)]
    if dp > 1:
        cmd.append("--use-distributed-optimizer")
    print(f"[bench] {layout}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL if not a.verbose else None)
    recs = [json.loads(line) for line in open(metrics) if '"kind": "train"' in line]
    steady = recs[a.warmup:] or recs
    step = statistics.median(r["step_time_s"] for r in steady)
    tokens = a.global_batch_size * a.seq_length
    return {
        "layout": layout, "gpus": tp * pp * dp, "step_time_s": step, "tokens_per_sec": tokens / step,
        "tokens_per_sec_per_gpu": tokens / step / (tp * pp * dp),
        "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in steady),
        "tflops_per_gpu_full_attention": statistics.median(r["tflops_per_gpu_full_attention"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady), "final_loss": recs[-1]["lm_loss"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["1x1x1", "2x2x1"], help="TPxPPxDP, first is the baseline")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model-preset", default="hcx-tiny")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--extra", default="", help="more driver flags, quoted")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = [run_layout(layout, a, work) for layout in a.layouts]
    base = results[0]
    per_token = lambda r: r["step_time_s"] * r["gpus"] / (a.global_batch_size * a.seq_length)  # noqa: E731
    # TFLOP/s and MFU count causal attention half (NVIDIA's tables); "full attn" counts it whole.
    print(f"\n| layout | procs | step s | tokens/s | tokens/s/proc | TFLOP/s/proc | TFLOP/s/proc full attn | MFU | "
          f"proc-s per token vs {base['layout']} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['gpus']} | {r['step_time_s']:.3f} | {r['tokens_per_sec']:.0f} | "
              f"{r['tokens_per_sec_per_gpu']:.0f} | {r['tflops_per_gpu']:.4f} | "
              f"{r['tflops_per_gpu_full_attention']:.4f} | {100 * r['mfu']:.3f}% | "
              f"{per_token(r) / per_token(base):.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
