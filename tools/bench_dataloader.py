#!/usr/bin/env python
"""Data-wait benchmark of the pretraining loaders: how long each training step waits for its batches
(`data_wait_s` in the driver's metrics: from `train_batches(iteration)` being called to its micro-batches being
ready) with the torch loader at 0 workers, the torch loader at N workers and the DALI loader (N Python workers),
in one invocation; ratios are to the torch 0-worker run.

Each loader runs the real driver (torchrun -m hcx_megatron.pretrain) on the same data; the first --warmup steps
(queue start-up) are dropped. Without --data-path it trains a tokenizer on examples/data and preprocesses it into
a temporary directory first. FIM at the character level (detokenize, cut, re-tokenize) makes reading a sample cost
something, as it does in the HCX code mixture.

    python tools/bench_dataloader.py --num-workers 2 --train-iters 20
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.bench_train import free_port  # noqa: E402


def build_example_data(workdir: str) -> tuple[str, str]:
    """(tokenizer dir, dataset prefix) from the bundled examples/data, as tests/conftest.py builds them."""
    from hcx_megatron.data.jsonl import iter_texts
    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess
    from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

    files = [os.path.join(REPO, "examples", "data", f"{lang}.jsonl") for lang in ("ko", "en", "code")]
    tok = os.path.join(workdir, "tok")
    train_tokenizer((t for d in iter_texts(files) for t in d.texts), tok, TrainConfig(vocab_size=2048, backend="hf"),
                    inputs=files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = preprocess(PreprocessConfig(inputs=files, output_prefix=os.path.join(workdir, "demo"),
                                              tokenizer_model=tok, append_eod=True, workers=1, progress=False))
    return tok, summary.outputs[0]


def run_loader(name: str, loader_args: list[str], a: argparse.Namespace, tok: str, data_path: list[str],
               workdir: str) -> dict:
    metrics = os.path.join(workdir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}", f"--master-port={free_port()}",
           "-m", "hcx_megatron.pretrain", "--device", a.device, "--model-preset", a.model_preset,
           "--tokenizer-model", tok, "--data-path", *data_path, "--split", "100,0,0",
           "--fim-rate", str(a.fim_rate), "--fim-split-unit", "char", "--seq-length", str(a.seq_length),
           "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
           "--train-iters", str(a.train_iters), "--metrics-jsonl", metrics, "--log-interval", "1000",
           *loader_args, *shlex.split(a.extra)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(a.omp_threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    from hcx_megatron.training.metrics import read_metrics

    records = read_metrics(metrics)[a.warmup:]
    waits = [r["data_wait_s"] for r in records]
    steps = [r["step_time_s"] for r in records]
    return {"loader": name, "args": " ".join(loader_args) or "(defaults)", "steps": len(records),
            "wait_ms_median": 1e3 * statistics.median(waits), "wait_ms_mean": 1e3 * statistics.fmean(waits),
            "step_ms_median": 1e3 * statistics.median(steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-workers", type=int, default=2, help="N: workers of the torch-N and DALI runs")
    p.add_argument("--data-prefetch-depth", type=int, default=2)
    p.add_argument("--dali-num-threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--model-preset", default="hcx-tiny")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--omp-threads", type=int, default=1)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--data-path", nargs="*", default=None, help="a Megatron blend; built from examples/data if absent")
    p.add_argument("--extra", default="", help="more driver flags, e.g. '--bf16'")
    a = p.parse_args(argv)
    if (a.tokenizer_model is None) != (a.data_path is None):
        p.error("give both --tokenizer-model and --data-path, or neither")
    with tempfile.TemporaryDirectory(prefix="bench_dataloader_") as workdir:
        if a.data_path is None:
            tok, prefix = build_example_data(workdir)
            data_path = ["0.7", prefix, "0.3", prefix]  # a weighted blend, as in production mixtures
        else:
            tok, data_path = a.tokenizer_model, a.data_path
        n = str(a.num_workers)
        depth = ["--data-prefetch-depth", str(a.data_prefetch_depth)]
        runs = [("torch-0", []), (f"torch-{n}", ["--num-workers", n, *depth]),
                (f"dali-{n}", ["--dataloader", "dali", "--num-workers", n, *depth,
                               "--dali-num-threads", str(a.dali_num_threads)])]
        results = [run_loader(name, args, a, tok, data_path, workdir) for name, args in runs]
    base = results[0]["wait_ms_mean"]
    print(f"| loader | flags | steps | data wait / step, median (ms) | mean (ms) | mean vs torch-0 | "
          f"step compute, median (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['loader']} | `{r['args']}` | {r['steps']} | {r['wait_ms_median']:.2f} | {r['wait_ms_mean']:.2f} | "
              f"{r['wait_ms_mean'] / base:.3f} | {r['step_ms_median']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
