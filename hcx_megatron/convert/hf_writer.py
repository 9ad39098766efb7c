"""Streaming writer of HF sharded safetensors: `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

The shard plan is fixed up front from the tensor names, shapes and dtypes (so file names know n and every file
header knows its offsets); tensors are then appended one by one in plan order, straight to disk. The files are
plain safetensors (8-byte header length, JSON header, data), read by safetensors/transformers as usual.
"""

from __future__ import annotations

import json
import os
import re

import torch

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


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class _StreamingSafetensorsFile:
    """One safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is known from
    the plan, so it is written first and each tensor's bytes are appended as soon as the tensor exists. Memory:
    one tensor, instead of a whole shard (which would be up to --max-shard-size)."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]):
        self.path = path
        self.order = [name for name, _, _ in specs]
        self.specs = {name: (shape, dtype) for name, shape, dtype in specs}
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, shape, dtype in specs:
            n = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                n *= d
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._f = open(path + ".partial", "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._next = 0

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else None
            raise RuntimeError(f"{self.path}: got tensor {name}, expected {expected} (plan order)")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: tensor {tuple(tensor.shape)} {tensor.dtype} differs from the plan "
                             f"{tuple(shape)} {dtype}")
        t = tensor.detach().contiguous().cpu()
        self._f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.order)

    def close(self) -> None:
        self._f.close()
        os.replace(self.path + ".partial", self.path)


class ShardedSafetensorsWriter:
    """HF sharded checkpoint writer. `plan` lists, per shard, (name, shape, dtype) in the order tensors arrive."""

    def __init__(self, out_dir: str, plan: list[list[tuple[str, tuple[int, ...], torch.dtype]]],
                 metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shard_of = {name: i for i, specs in enumerate(plan) for name, _, _ in specs}
        self._open: dict[int, _StreamingSafetensorsFile] = {}
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0
        self.files_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise KeyError(f"tensor {name} is not in the shard plan")
        i = self._shard_of[name]
        if i not in self._open:
            fname = shard_file_name(i + 1, len(self.plan))
            self._open[i] = _StreamingSafetensorsFile(os.path.join(self.out_dir, fname), self.plan[i], self.metadata)
        f = self._open[i]
        f.append(name, tensor)
        self._weight_map[name] = os.path.basename(f.path)
        self._total_bytes += tensor.numel() * tensor.element_size()
        if f.complete:
            f.close()
            del self._open[i]
            self.files_written += 1

    def close(self) -> None:
        missing = [name for specs in self.plan for name, _, _ in specs if name not in self._weight_map]
        if missing or self._open:
            raise RuntimeError(f"shards incomplete; tensors never added: {missing[:8]}")
        index = {"metadata": {"total_size": self._total_bytes},
                 "weight_map": {k: self._weight_map[k] for k in sorted(self._weight_map)}}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
