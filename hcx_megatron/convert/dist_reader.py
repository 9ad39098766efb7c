"""Read model tensors out of a megatron-core `torch_dist` checkpoint in ONE process, one layer at a time.

Why not build the model at TP1/PP1 and call `load_checkpoint`: that holds the whole model (and needs process
groups). Why not `megatron.core.dist_checkpointing.load` with a ShardedTensor per layer: in a 1-process world its
conversion to torch ShardedTensors places the fragments it does not own on rank `(rank + 1) % world_size`, i.e.
on rank 0 again, and torch then rejects the request ("number of local shards does not match"); it can load a
tensor only whole.

megatron's `torch_dist` backend stores plain PyTorch Distributed Checkpoint (DCP) files: a `.metadata` pickle
with, for every tensor, its global shape and the chunks (offsets, sizes) each rank wrote, plus `__R_T.distcp`
files. We ask DCP's own resharding helper (`create_read_items_for_chunk_list`) which stored chunks overlap the
region we want (e.g. index l of a layer-stacked tensor), and DCP's `FileSystemReader` reads just those byte
ranges. Peak memory is therefore about one layer (or the embedding, the largest single tensor), independent
of the number of layers and of the TP/PP/VPP the checkpoint was written with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from hcx_megatron.training.checkpoint import CONFIG_FILE, resolve_checkpoint


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class _RegionPlanner(LoadPlanner):
    """Minimal DCP LoadPlanner: destination buffers are given per fqn; nothing else is loaded."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers

    # The reader only calls these two for tensor items; the rest of the interface is unused here.
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.buffers[read_item.dest_index.fqn]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, off, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def set_up_planner(self, *a, **k):  # pragma: no cover - interface filler
        raise NotImplementedError

    def create_local_plan(self):  # pragma: no cover
        raise NotImplementedError

    def create_global_plan(self, plans):  # pragma: no cover
        raise NotImplementedError

    def finish_plan(self, plan):  # pragma: no cover
        raise NotImplementedError

    def load_bytes(self, read_item, value):  # pragma: no cover
        raise NotImplementedError(f"unexpected byte item {read_item.dest_index.fqn}")


class DistCheckpointReader:
    """Random access to the model tensors of one checkpoint directory (or a --save root: its latest)."""

    def __init__(self, path: str):
        self.path = resolve_checkpoint(path)
        meta_json = os.path.join(self.path, "metadata.json")
        with open(meta_json, encoding="utf-8") as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{meta_json}: sharded_backend={backend!r}; only megatron's 'torch_dist' format is "
                             "supported")
        if not os.path.exists(os.path.join(self.path, ".metadata")):
            raise FileNotFoundError(f"{self.path}: no .metadata (incomplete torch_dist checkpoint)")
        self._reader = FileSystemReader(self.path)
        self._metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)
        self._check_files()
        config_path = os.path.join(self.path, CONFIG_FILE)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{self.path}: no {CONFIG_FILE}; was it written by hcx_megatron?")
        with open(config_path, encoding="utf-8") as f:
            self.config: dict[str, Any] = json.load(f)

    def _check_files(self) -> None:
        needed = {info.relative_path for info in self._metadata.storage_data.values()}
        missing = sorted(p for p in needed if not os.path.exists(os.path.join(self.path, p)))
        if missing:
            raise FileNotFoundError(f"{self.path}: missing checkpoint shard file(s) {missing[:8]}"
                                    + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    # ------------------------------------------------------------------ metadata
    def tensors(self) -> dict[str, TensorInfo]:
        out = {}
        for key, md in self._metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                out[key] = TensorInfo(key, tuple(md.size), md.properties.dtype)
        return out

    def info(self, key: str) -> TensorInfo:
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
        return TensorInfo(key, tuple(md.size), md.properties.dtype)

    def model_bytes(self) -> int:
        """Bytes of the model weights (optimizer state excluded)."""
        return sum(t.nbytes for k, t in self.tensors().items() if not k.startswith("optimizer"))

    # ------------------------------------------------------------------ reading
    def read_regions(self, requests: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """{key: (offsets, sizes)} -> {key: tensor of `sizes`} holding that region of the global tensor."""
        buffers, items = {}, []
        for key, (offsets, sizes) in requests.items():
            md = self._metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
            if len(offsets) != len(md.size) or any(o + s > g for o, s, g in zip(offsets, sizes, md.size)):
                raise ValueError(f"{key}: region offsets={offsets} sizes={sizes} outside global shape {tuple(md.size)}")
            buffers[key] = torch.empty(sizes, dtype=md.properties.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            region_items = create_read_items_for_chunk_list(key, md, [chunk])
            covered = sum(_numel(it.lengths) for it in region_items)
            if covered != buffers[key].numel():
                raise ValueError(f"{self.path}: stored chunks of {key} cover {covered} of the "
                                 f"{buffers[key].numel()} requested values (incomplete checkpoint?)")
            items.extend(region_items)
        self._reader.read_data(LoadPlan(items), _RegionPlanner(buffers)).wait()
        return buffers

    def read(self, key: str) -> torch.Tensor:
        shape = self.info(key).shape
        return self.read_regions({key: ((0,) * len(shape), shape)})[key]

    def read_layer(self, keys: list[str], layer: int) -> dict[str, torch.Tensor]:
        """Index `layer` of each layer-stacked tensor [num_layers, ...] -> {key: tensor without the layer axis}."""
        req = {}
        for key in keys:
            shape = self.info(key).shape
            if not 0 <= layer < shape[0]:
                raise IndexError(f"{key}: layer {layer} outside the stacked axis of size {shape[0]}")
            req[key] = ((layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
        return {k: v[0] for k, v in self.read_regions(req).items()}


def _numel(lengths) -> int:
    n = 1
    for x in lengths:
        n *= int(x)
    return n


__all__ = ["DistCheckpointReader", "TensorInfo", "MetadataIndex"]
