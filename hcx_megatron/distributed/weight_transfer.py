"""Versions of one model's weights handed from the partition that trains it to a partition that only runs it
(PPO's async rollout partition; hcx_megatron/distributed/partition.py has the partitions).

- "p2p": both partitions have the same layout and size, so rank j sends its own shards to rank j over their pair
  group, parameter by parameter (no resharding, nothing on disk).
- "checkpoint": another layout; each version is a weights-only dist checkpoint under `root`/v_NNNNNNN that the
  receiver loads resharded, like any checkpoint. The sender keeps only the versions the receiver may still need.

The sender never waits for the receiver to take a version (it takes one when it needs it: waiting could deadlock
against the receiver's own sends); a header from leader to leader names the version, and a last header says stop.
"""

from __future__ import annotations

import os
import shutil

import torch

from hcx_megatron.distributed.partition import Partition
from hcx_megatron.model.builder import sync_params_before_read, unwrap
from hcx_megatron.training.checkpoint import load_model_weights, save_model_weights

_TENSOR_TAG = 1000  # + parameter index, on the pair groups (only weight tensors travel there)


def _params(chunks) -> list[torch.Tensor]:
    return [p for c in chunks for _, p in unwrap(c).named_parameters()]


class WeightSender:
    def __init__(self, part: Partition, to: str, mode: str, root: str | None, header_tag: int):
        """mode: "p2p" or "checkpoint" (hcx_megatron.rlhf.placement.rollout_weight_transfer chooses)."""
        self.part, self.to, self.mode, self.root, self.tag = part, to, mode, root, header_tag
        self._pending: list = []
        self._buffers: list[torch.Tensor] = []  # alive until their sends complete

    def _wait(self) -> None:
        for w in self._pending:
            w.wait()
        self._pending = []

    def publish(self, chunks, version: int, keep_from: int, **header) -> None:
        """Send weights version `version` (collective over this partition) and return without waiting for the
        receiver; checkpoint mode removes the versions below `keep_from`, which the receiver no longer needs."""
        self._wait()
        header = {**header, "version": version}
        sync_params_before_read(chunks)  # both modes read the parameters directly
        if self.mode == "p2p":
            pair = self.part.pair(self.to)
            self._buffers = [p.detach().to("cpu", copy=True) for p in _params(chunks)]
            self._pending = [pair.send([t], 1, _TENSOR_TAG + i) for i, t in enumerate(self._buffers)]
        else:
            header["path"] = save_model_weights(os.path.join(self.root, f"v_{version:07d}"), chunks)
            for name in os.listdir(self.root) if self.part.is_leader else ():
                if name.startswith("v_") and int(name[2:].split(".")[0]) < keep_from:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if self.part.is_leader:
            self._pending.append(self.part.isend(self.to, self.tag, header))

    def stop(self, code: int) -> None:
        """The last header (the receiver takes it after every version it loads); checkpoint mode removes `root`."""
        self._wait()
        self.part.tell([self.to], self.tag, {"stop": code})
        if self.mode == "checkpoint" and self.part.is_leader:
            shutil.rmtree(self.root, ignore_errors=True)


def receive_weights(part: Partition, frm: str, mode: str, chunks, header_tag: int) -> dict:
    """The next header from `frm` (collective over this partition); unless it says stop, its weights are now in
    `chunks`."""
    pair = part.pair(frm) if mode == "p2p" else None  # before the header: the sender built its side first
    header = part.hear(frm, header_tag)
    if "stop" in header:
        return header
    if mode == "checkpoint":
        load_model_weights(header["path"], chunks)
        return header
    with torch.no_grad():
        for i, p in enumerate(_params(chunks)):
            buf = torch.empty(p.shape, dtype=p.dtype)
            pair.recv([buf], 0, _TENSOR_TAG + i).wait()
            p.copy_(buf)
    return header


__all__ = ["WeightSender", "receive_weights"]
