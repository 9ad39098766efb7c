"""Pretraining data: megatron-core GPTDataset / BlendedMegatronDatasetBuilder over `.bin/.idx` blends,
plus the micro-batch sampler that makes the data position a pure function of the iteration."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from hcx_megatron.config.args import Config


def validate_blend_paths(data_path: list[str], flag: str = "--data-path") -> None:
    """Megatron blends are `[w1] prefix1 [w2] prefix2 ...`; each prefix needs prefix.bin and prefix.idx."""
    for item in data_path:
        try:
            float(item)
            continue
        except ValueError:
            pass
        missing = [ext for ext in (".bin", ".idx") if not os.path.exists(item + ext)]
        if missing:
            raise FileNotFoundError(f"{flag}: dataset prefix {item!r} has no {' or '.join(item + e for e in missing)}")


def dataset_config(cfg: Config, tokenizer, seq_length: int) -> GPTDatasetConfig:
    d = cfg.data
    common = dict(
        random_seed=cfg.training.seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,  # causal attention is implied; SDPA/TE use their causal kernels
        path_to_cache=d.data_cache_path,
        mmap_bin_files=True,
    )
    if d.mock_data:
        return GPTDatasetConfig(blend=None, split="1,1,1", **common)
    if d.valid_data_path:
        blend_per_split = [get_blend_from_list(d.data_path), get_blend_from_list(d.valid_data_path), None]
        common["blend_per_split"] = blend_per_split
        blend = None
        split = None
    else:
        blend, split = get_blend_from_list(d.data_path), d.split
    if d.fim_rate > 0:
        from hcx_megatron.data.fim import FIMGPTDatasetConfig

        return FIMGPTDatasetConfig(blend=blend, split=split, fim_rate=d.fim_rate, fim_spm_rate=d.fim_spm_rate,
                                   fim_split_unit=d.fim_split_unit, **common)
    return GPTDatasetConfig(blend=blend, split=split, **common)


def _weighted(data_path: list[str]) -> bool:
    return get_blend_from_list(data_path)[1] is not None


def check_split_coverage(data_path: list[str], split: str, needed: tuple[bool, bool, bool]) -> None:
    """Fail clearly instead of hanging: megatron-core loops forever sizing a split that has no documents but is
    asked for samples. Splits are cut by document count exactly as megatron does (rounded cumulative fractions)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    prefixes = get_blend_from_list(data_path)[0]
    weighted = _weighted(data_path)
    for prefix in prefixes:
        docs = len(IndexedDataset(prefix, mmap=True).sequence_lengths)
        for name, bounds, need in zip(("train", "validation", "test"), matrix, needed):
            if bounds is None:
                continue
            n = int(round(bounds[1] * docs)) - int(round(bounds[0] * docs))
            if n == 0 and (need or weighted):
                raise ValueError(
                    f"--split {split}: the {name} part of {prefix} ({docs} documents) is empty; give that part weight "
                    f"0 (e.g. --split 98,2,0) or use more data")


def build_gpt_datasets(cfg: Config, tokenizer, seq_length: int, num_samples: tuple[int, int, int]):
    """(train, valid, test) datasets, each None when its split is not built."""
    needed = (True, cfg.training.eval_interval > 0, False)
    if cfg.data.data_path:
        validate_blend_paths(cfg.data.data_path)
        validate_blend_paths(cfg.data.valid_data_path, "--valid-data-path")
        if not cfg.data.valid_data_path:
            check_split_coverage(cfg.data.data_path, cfg.data.split, needed)
    config = dataset_config(cfg, tokenizer, seq_length)
    if cfg.data.mock_data:
        cls = MockGPTDataset
    elif cfg.data.fim_rate > 0:
        from hcx_megatron.data.fim import FIMGPTDataset

        cls = FIMGPTDataset
    else:
        cls = GPTDataset
    # Unused splits: None (not sized) for plain prefixes; megatron insists on a count for weighted blends, where
    # check_split_coverage has made sure no weighted split is empty.
    weighted = bool(cfg.data.data_path) and _weighted(cfg.data.data_path)
    sizes = [n if (need or weighted) else None for n, need in zip(num_samples, needed)]
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


def microbatch_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[list[int]]:
    """Sample indices of each micro-batch of one global batch for one DP rank (Megatron's order: each slice of
    micro_batch_size x dp_size consecutive samples is dealt to DP ranks in rank order)."""
    out = []
    per_step = micro_batch_size * dp_size
    for start in range(consumed_samples, consumed_samples + global_batch_size, per_step):
        first = start + dp_rank * micro_batch_size
        out.append(list(range(first, first + micro_batch_size)))
    return out


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0] if samples[0][k] is not None}


class GlobalBatchIterator:
    """Yields this DP rank's micro-batches for the global batch starting at `consumed_samples`.

    Stateless apart from `consumed_samples`, which is derived from the iteration on resume, so a resumed run
    reads exactly the batches the uninterrupted run would have read.
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size

    def microbatches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        for idx in microbatch_indices(consumed_samples, self.global_batch_size, self.micro_batch_size,
                                      dp_rank, dp_size):
            yield collate([self.dataset[i % len(self.dataset)] for i in idx])


def sample_counts(cfg: Config, train_iters: int) -> tuple[int, int, int]:
    """Samples to draw per split, as Megatron-LM counts them."""
    t = cfg.training
    gbs = t.global_batch_size
    evals = (train_iters // t.eval_interval + 1) if t.eval_interval else 0
    return train_iters * gbs, evals * t.eval_iters * gbs, t.eval_iters * gbs


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    return int(np.prod(batch["tokens"].shape))
