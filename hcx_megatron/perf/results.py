"""Measured runs: read the driver's metrics JSONL (format in docs/interfaces) and summarise a run.

A run's first iterations include compilation, allocator warm-up and data-loader start, so the
summary drops `skip` leading train records (at least one is always kept) and reports medians,
which one slow step (checkpoint save, GC) cannot move.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

TRAIN_KEYS = ("iteration", "step_time_s")


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL; a malformed line raises naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: metrics file not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if rec.get("kind") == "train":
                missing = [k for k in TRAIN_KEYS if k not in rec]
                if missing:
                    raise ValueError(f"{p}:{lineno}: train record lacks {missing}")
            out.append(rec)
    return out


@dataclass(frozen=True)
class RunSummary:
    iterations: int  # train records used
    step_time_s: float
    tokens_per_sec_per_gpu: float | None
    tflops_per_gpu: float | None
    mfu: float | None
    mem_gb: float | None
    final_lm_loss: float | None


def summarize(records: list[dict], skip: int = 2, source: str = "<records>") -> RunSummary:
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        raise ValueError(f"{source}: no train records (did the run reach its first logged step?)")
    # When a run was resumed the JSONL holds both attempts; keep the last record per iteration.
    by_iter = {}
    for r in train:
        by_iter[r["iteration"]] = r
    train = [by_iter[k] for k in sorted(by_iter)]
    used = train[min(skip, len(train) - 1):]

    def med(key: str) -> float | None:
        vals = [float(r[key]) for r in used if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    mems = [float(r["mem_gb"]) for r in train if isinstance(r.get("mem_gb"), (int, float))]
    return RunSummary(iterations=len(used), step_time_s=med("step_time_s"),
                      tokens_per_sec_per_gpu=med("tokens_per_sec_per_gpu"), tflops_per_gpu=med("tflops_per_gpu"),
                      mfu=med("mfu"), mem_gb=max(mems) if mems else None,
                      final_lm_loss=float(train[-1]["lm_loss"]) if "lm_loss" in train[-1] else None)


def summarize_file(path: str | Path, skip: int = 2) -> RunSummary:
    return summarize(read_metrics_jsonl(path), skip=skip, source=str(path))


__all__ = ["read_metrics_jsonl", "RunSummary", "summarize", "summarize_file"]
