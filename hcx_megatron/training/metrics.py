"""Training metrics: one JSON object per line (--metrics-jsonl), TensorBoard scalars (--tensorboard-dir) and a
concise console line with rate and ETA. Only global rank 0 writes."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import psutil
import torch


def step_throughput(cfg, seq_length: int, global_tokens: int, step_time_s: float, num_gpus: int,
                    output_size: int | None = None) -> dict[str, float]:
    """Throughput fields of one training step's metrics record.

    Model FLOPs come from hcx_megatron.perf.flops: `tflops_per_gpu` and `mfu` count causal attention half, as
    NVIDIA's published tables (Megatron-Bridge, NeMo) do; the `*_full_attention` fields count it whole
    (Narayanan et al.'s convention). MFU divides by the peak of the run's precision (--fp8-peak-tflops for
    --fp8-format runs, else --peak-tflops). `output_size`: width of the model's output projection when it is
    not the vocabulary (1 for reward and value heads). `num_gpus` is the whole world (TP x PP x CP x DP):
    every rank, whatever its role, is a GPU the step occupied.
    """
    from hcx_megatron.perf.flops import model_flops_per_token

    per_token = {
        causal: model_flops_per_token(cfg.model, seq_length, padded_vocab=cfg.padded_vocab_size, causal=causal,
                                      output_size=output_size)
        for causal in (True, False)
    }
    peak = cfg.logging.fp8_peak_tflops if cfg.runtime.fp8_format else cfg.logging.peak_tflops
    tokens_per_sec = global_tokens / step_time_s
    per_gpu = tokens_per_sec / num_gpus
    tflops, tflops_full = per_token[True] * per_gpu / 1e12, per_token[False] * per_gpu / 1e12
    return {
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_gpu": per_gpu,
        "tflops_per_gpu": tflops,
        "tflops_per_gpu_full_attention": tflops_full,
        "mfu": tflops / peak,
        "mfu_full_attention": tflops_full / peak,
        "peak_tflops": peak,
    }


def memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsWriter:
    def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None, enabled: bool, train_iters: int):
        self.enabled = enabled
        self.train_iters = train_iters
        self._jsonl = None
        self._tb = None
        self._start = time.time()
        self._start_iter: int | None = None
        self.label = ""  # console prefix, e.g. "[critic] " for a second model's loop in the same job
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
            self._jsonl.flush()
        if self._tb and record.get("kind") in ("train", "eval"):
            step = record["iteration"]
            prefix = "train/" if record["kind"] == "train" else "valid/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration",):
                    self._tb.add_scalar(prefix + key, value, step)
            self._tb.flush()

    def console(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        it = record["iteration"]
        if self._start_iter is None:
            self._start_iter, self._start = it - 1, time.time() - record.get("step_time_s", 0.0)
        done = it - self._start_iter
        rate = done / max(time.time() - self._start, 1e-9)
        eta = (self.train_iters - it) / rate if rate > 0 else float("inf")
        print(
            f"{self.label}iter {it:>6}/{self.train_iters} | lm loss {record['lm_loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['step_time_s'] * 1000:.0f} ms/step | "
            f"{record['tokens_per_sec']:.0f} tok/s | {record['tflops_per_gpu']:.3g} TFLOP/s/GPU | "
            f"MFU {100 * record['mfu']:.3g}% | mem {record['mem_gb']:.2f} GB | ETA {eta:.0f}s",
            flush=True,
        )

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def read_metrics(path: str, kind: str | None = "train") -> list[dict[str, Any]]:
    """Read a metrics JSONL (tests and tools use this)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out
