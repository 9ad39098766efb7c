"""Streaming writer of HF sharded safetensors: `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

The shard plan is fixed up front from the tensor names and sizes (so file names know n), then tensors are
added one by one in plan order and each shard is written and dropped as soon as it is complete.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (HF's convention: GB = 10^9)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return int(value)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: str, plan: list[list[str]], metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shard_of = {name: i for i, names in enumerate(plan) for name in names}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0
        self.files_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise KeyError(f"tensor {name} is not in the shard plan")
        i = self._shard_of[name]
        self._pending.setdefault(i, {})[name] = tensor.contiguous()
        if len(self._pending[i]) == len(self.plan[i]):
            self._write(i)

    def _write(self, i: int) -> None:
        tensors = self._pending.pop(i)
        fname = shard_file_name(i + 1, len(self.plan))
        save_file(tensors, os.path.join(self.out_dir, fname), metadata=self.metadata)
        for name, t in tensors.items():
            self._weight_map[name] = fname
            self._total_bytes += t.numel() * t.element_size()
        self.files_written += 1

    def close(self) -> None:
        if self._pending:
            missing = [n for i in self._pending for n in self.plan[i] if n not in self._pending[i]]
            raise RuntimeError(f"shards incomplete; tensors never added: {missing[:8]}")
        index = {"metadata": {"total_size": self._total_bytes},
                 "weight_map": {k: self._weight_map[k] for k in sorted(self._weight_map)}}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
