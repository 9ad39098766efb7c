"""Pretraining micro-batch loaders (`--dataloader torch|dali`) that prefetch ahead of the training step.

Both read the same megatron-core dataset object (GPTDataset, BlendedDataset, the FIM dataset, mock data) through
`StepMicroBatches`, which maps a position in the micro-batch stream to the sample indices that
`GlobalBatchIterator` would read at that step (Megatron's order, `microbatch_indices`). The position is a pure
function of the iteration, so every loader yields bitwise the same tensors, and a loader asked for a step other than
the next one (resume, a sequence-length phase switch) restarts its queue there.

- torch: a `DataLoader` over `StepMicroBatches` — `--num-workers` worker processes, each keeping
  `--data-prefetch-depth` micro-batches ready; on GPU pinned memory and `.cuda(non_blocking=True)` copies.
- dali: a DALI pipeline whose `external_source` reads `StepMicroBatches` sample by sample (in `--num-workers`
  Python worker processes when > 0), `--dali-num-threads` CPU threads, `--data-prefetch-depth` micro-batches
  queued; on GPU its outputs are `.gpu()`, so DALI does the host-to-device copy from its pinned staging buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from hcx_megatron.data.dali_probe import dali_import_error
from hcx_megatron.data.gpt_datasets import collate, microbatch_indices


class StepMicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of this DP rank's stream that starts at optimizer step `first_step`: k = step offset x
    micro-batches per step + micro-batch. `num_steps` steps long (to the end of the sequence-length phase)."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 first_step: int, num_steps: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.first_step = first_step
        self.num_steps = num_steps
        self.microbatches_per_step = global_batch_size // (micro_batch_size * dp_size)

    def __len__(self) -> int:
        return self.num_steps * self.microbatches_per_step

    def sample_indices(self, k: int) -> list[int]:
        step, micro = divmod(k, self.microbatches_per_step)
        consumed = (self.first_step + step) * self.global_batch_size
        first = consumed + micro * self.micro_batch_size * self.dp_size
        # One micro-batch of microbatch_indices, without building the whole step's list.
        return microbatch_indices(first, self.micro_batch_size * self.dp_size, self.micro_batch_size,
                                  self.dp_rank, self.dp_size)[0]

    def sample(self, i: int) -> dict:
        return self.dataset[i % len(self.dataset)]  # GlobalBatchIterator's wrap-around

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return collate([self.sample(i) for i in self.sample_indices(k)])


def sample_fields(dataset) -> list[tuple[str, torch.dtype, int]]:
    """(key, dtype, ndim) of the tensors a sample carries (what `collate` keeps: None entries are dropped).
    A BlendedDataset adds a scalar `dataset_id`."""
    probe = dataset[0]
    return [(k, torch.as_tensor(v).dtype, torch.as_tensor(v).dim()) for k, v in probe.items() if v is not None]


class _StepLoader:
    """Serves the micro-batches of step s (0-based within its phase) from a queue started at some step; a request
    for any step other than the next one restarts the queue there."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_steps: int, device: str):
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_steps = num_steps
        self.device = device
        self.microbatches_per_step = global_batch_size // (micro_batch_size * dp_size)
        self._next_step: int | None = None
        self._queue = None
        self.restarts = 0

    def stream(self, first_step: int) -> StepMicroBatches:
        return StepMicroBatches(self.dataset, self.global_batch_size, self.micro_batch_size, self.dp_rank,
                                self.dp_size, first_step, self.num_steps - first_step)

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside this phase's {self.num_steps} steps")
        if step != self._next_step:
            self.close()
            self._queue = self._start(step)
            self.restarts += 1
        self._next_step = step + 1
        return [self._next() for _ in range(self.microbatches_per_step)]

    def close(self) -> None:
        self._queue = None
        self._next_step = None

    def _start(self, first_step: int):
        raise NotImplementedError

    def _next(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TorchStepLoader(_StepLoader):
    def __init__(self, *args, num_workers: int = 0, prefetch_depth: int = 2, **kw):
        super().__init__(*args, **kw)
        self.num_workers, self.prefetch_depth = num_workers, prefetch_depth

    def _start(self, first_step: int):
        loader = torch.utils.data.DataLoader(
            self.stream(first_step), batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.device == "cuda",  # pinned host buffers make the non_blocking copy below asynchronous
            # Workers' own seeds do not matter: sample randomness (mock data, FIM) is keyed by the sample index.
            prefetch_factor=self.prefetch_depth if self.num_workers else None)
        return iter(loader)

    def _next(self) -> dict[str, torch.Tensor]:
        batch = next(self._queue)
        if self.device == "cuda":
            return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        return batch


class _DaliSampleSource:
    """external_source callback: sample j of the pipeline's epoch is position j % micro_batch_size of micro-batch
    j // micro_batch_size of the stream. A module-level class so that spawned DALI workers can unpickle it."""

    def __init__(self, stream: StepMicroBatches, keys: list[str]):
        self.stream, self.keys = stream, keys

    def __call__(self, sample_info) -> tuple[np.ndarray, ...]:
        k, position = divmod(sample_info.idx_in_epoch, self.stream.micro_batch_size)
        if k >= len(self.stream):
            raise StopIteration
        sample = self.stream.sample(self.stream.sample_indices(k)[position])
        return tuple(torch.as_tensor(sample[key]).contiguous().numpy() for key in self.keys)


class DaliStepLoader(_StepLoader):
    def __init__(self, *args, num_workers: int = 0, prefetch_depth: int = 2, num_threads: int = 2, **kw):
        super().__init__(*args, **kw)
        self.num_workers, self.prefetch_depth, self.num_threads = num_workers, prefetch_depth, num_threads
        self.fields = sample_fields(self.dataset)

    def _start(self, first_step: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        keys = [k for k, _, _ in self.fields]
        source = _DaliSampleSource(self.stream(first_step), keys)
        on_gpu = self.device == "cuda"

        @pipeline_def(batch_size=self.micro_batch_size, num_threads=self.num_threads,
                      device_id=torch.cuda.current_device() if on_gpu else None,
                      prefetch_queue_depth=self.prefetch_depth, py_num_workers=self.num_workers,
                      # fork is unsafe once the process holds a CUDA context (the training process does on GPU)
                      py_start_method="spawn" if on_gpu else "fork")
        def pipeline():
            outputs = fn.external_source(source=source, num_outputs=len(keys), batch=False,
                                         parallel=self.num_workers > 0,
                                         prefetch_queue_depth=self.prefetch_depth if self.num_workers else None,
                                         dtype=[types.to_dali_type(np.dtype(str(dt).removeprefix("torch.")))
                                                for _, dt, _ in self.fields],
                                         ndim=[ndim for _, _, ndim in self.fields])
            return tuple(o.gpu() for o in outputs) if on_gpu else tuple(outputs)

        pipe = pipeline()
        # size=-1: run until the external source raises StopIteration (the end of the phase).
        return DALIGenericIterator([pipe], output_map=keys, size=-1, auto_reset=False)

    def _next(self) -> dict[str, torch.Tensor]:
        return next(self._queue)[0]  # one pipeline: its dict of key -> tensor [micro_batch_size, seq]


def build_step_loader(cfg, dataset, num_steps: int, device: str, dp_rank: int, dp_size: int) -> _StepLoader:
    """The loader `--dataloader` names, over `dataset`, for a phase of `num_steps` optimizer steps."""
    d, t = cfg.data, cfg.training
    args = (dataset, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, num_steps, device)
    if d.dataloader == "dali":
        return DaliStepLoader(*args, num_workers=d.num_workers, prefetch_depth=d.data_prefetch_depth,
                              num_threads=d.dali_num_threads)
    return TorchStepLoader(*args, num_workers=d.num_workers, prefetch_depth=d.data_prefetch_depth)


__all__ = ["StepMicroBatches", "TorchStepLoader", "DaliStepLoader", "build_step_loader", "dali_import_error",
           "sample_fields"]
