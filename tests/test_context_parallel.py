"""Context parallelism: each CP rank's share of a batch (hcx_megatron/data/context_parallel.py), packed documents
padded for it (sft_dataset.collate), and packed SFT steps that carry per-token document ids instead of
[b, 1, s, s] masks. CPU mode cannot run CP > 1, so the CP state is monkeypatched into megatron's parallel_state
(megatron's slicing functions read it when no group is given); the end-to-end CP run is a GPU check."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from megatron.core import parallel_state

from hcx_megatron.data.context_parallel import packed_batch_for_transformer_engine, slice_batch_for_context_parallel
from hcx_megatron.data.sft_dataset import (BatchingConfig, Conversation, MicroBatchPlan, block_causal_mask, collate,
                                           round_up)


def _set_cp(monkeypatch, size: int, rank: int) -> None:
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: size)
    monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)


def _batch(rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 1000, (rows, length), generator=g),
        "labels": torch.randint(0, 1000, (rows, length), generator=g),
        "loss_mask": (torch.rand(rows, length, generator=g) < 0.7).float(),
        "position_ids": torch.arange(length).repeat(rows, 1),
        "lengths": torch.full((rows,), length),  # not laid out [b, s]: left as it is
    }


def _cp_shares(monkeypatch, batch, cp: int) -> list[dict[str, torch.Tensor]]:
    shares = []
    for rank in range(cp):
        _set_cp(monkeypatch, cp, rank)
        shares.append(slice_batch_for_context_parallel(batch))
    return shares


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_shares_reassemble_the_batch(monkeypatch, cp):
    batch = _batch(rows=3, length=32)
    original = {k: v.clone() for k, v in batch.items()}
    shares = _cp_shares(monkeypatch, batch, cp)
    chunk = 32 // (2 * cp)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        whole = torch.empty_like(batch[key])
        for rank, share in enumerate(shares):
            assert share[key].shape == (3, 32 // cp)
            # rank r holds chunks r and 2*CP-1-r, in that order
            for half, c in enumerate((rank, 2 * cp - 1 - rank)):
                whole[:, c * chunk:(c + 1) * chunk] = share[key][:, half * chunk:(half + 1) * chunk]
        assert torch.equal(whole, original[key]), key
    assert all(share["lengths"] is batch["lengths"] for share in shares)
    assert all(torch.equal(batch[k], original[k]) for k in batch)  # the micro-batch itself stays whole


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_shares_balance_causal_work(monkeypatch, cp):
    """A token at position p attends to p + 1 keys: every rank gets the same sum."""
    shares = _cp_shares(monkeypatch, _batch(rows=1, length=64), cp)
    work = [int((share["position_ids"] + 1).sum()) for share in shares]
    assert len(set(work)) == 1, work
    assert sum(work) == 64 * 65 // 2


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_position_ids_are_the_rope_positions_of_the_rank(monkeypatch, cp):
    """megatron's RoPE picks each CP rank's rotary embeddings itself (get_pos_emb_on_this_cp_rank); the tokens a
    rank gets must be the ones at those positions."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    tensor = torch.tensor  # rope_utils builds its index pinned and on CUDA: plain CPU tensors here
    monkeypatch.setattr(torch, "tensor", lambda *a, pin_memory=False, **k: tensor(*a, **k))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    length = 48
    rotary_positions = torch.arange(length, dtype=torch.float32).view(length, 1, 1, 1)  # RoPE's [s, 1, 1, dim]
    shares = _cp_shares(monkeypatch, _batch(rows=2, length=length), cp)
    for rank, share in enumerate(shares):
        group = types.SimpleNamespace(size=lambda: cp, rank=lambda r=rank: r)
        rope = get_pos_emb_on_this_cp_rank(rotary_positions, 0, group).view(-1).long()
        assert torch.equal(share["position_ids"], rope.expand(2, -1)), rank


def test_cp_one_is_a_no_op_and_lengths_must_split(monkeypatch):
    batch = _batch(rows=2, length=12)
    _set_cp(monkeypatch, 1, 0)
    assert slice_batch_for_context_parallel(batch) is batch
    _set_cp(monkeypatch, 2, 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        slice_batch_for_context_parallel(_batch(rows=2, length=10))


# ------------------------------------------------------------------------------------------ packed (THD)
def _conversations(lengths, seed=0) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(lengths):
        loss = (rng.random(n) < 0.6).astype(np.uint8)
        loss[-1] = 1
        out.append(Conversation(rng.integers(20, 500, size=n).astype(np.int32), loss, (1 - loss).astype(np.uint8),
                                f"fake:{k}"))
    return out


def test_collate_pads_each_packed_document_for_context_parallel():
    convs = _conversations([6, 3, 4, 9])  # input lengths 5, 2, 3, 8
    mb = collate(convs, [[0, 1], [2, 3]], pad_multiple=16, packed=True, document_multiple=4)
    assert mb["tokens"].shape == (2, 16)
    assert mb["cu_seqlens"].tolist() == [0, 5, 7, 11, 14, 22, 26]  # real tokens of each segment
    assert mb["cu_seqlens_padded"].tolist() == [0, 8, 12, 16, 20, 28, 32]  # documents padded to 4; row tails
    flat = {k: mb[k].view(-1) for k in ("tokens", "labels", "loss_mask", "user_mask", "position_ids")}
    segments = zip(mb["cu_seqlens"][:-1], mb["cu_seqlens"][1:], mb["cu_seqlens_padded"][:-1],
                   mb["cu_seqlens_padded"][1:])
    docs = iter([convs[0], convs[1], None, convs[2], convs[3], None])
    for (c0, c1, p0, p1), conv in zip(segments, docs):
        if conv is None:  # the row's tail padding, a segment of its own
            continue
        real, start = int(c1 - c0), int(p0)
        assert real == conv.input_length and int(p1 - p0) == round_up(real, 4)
        assert flat["tokens"][start:start + real].tolist() == conv.ids[:-1].tolist()
        assert flat["labels"][start:start + real].tolist() == conv.ids[1:].tolist()
        assert flat["loss_mask"][start:start + real].tolist() == conv.loss_mask[1:].tolist()
        assert flat["loss_mask"][start + real:int(p1)].sum() == 0 and flat["user_mask"][start + real:int(p1)].sum() == 0
        assert flat["position_ids"][start:start + real].tolist() == list(range(real))
    # Without CP nothing moves: cu_seqlens_padded is cu_seqlens.
    plain = collate(convs, [[0, 1], [2, 3]], pad_multiple=16, packed=True)
    assert plain["cu_seqlens"].tolist() == plain["cu_seqlens_padded"].tolist() == [0, 5, 7, 16, 19, 27, 32]
    with pytest.raises(ValueError, match="pad multiple 6"):
        collate(convs, [[0, 1]], pad_multiple=6, packed=True, document_multiple=4)


def test_packing_plan_counts_document_padding():
    lengths = np.random.default_rng(4).integers(2, 40, size=200).tolist()
    convs = _conversations(lengths)
    config = BatchingConfig(seq_length=64, max_tokens=256, pad_multiple=8, packing=True, document_multiple=8)
    plan = MicroBatchPlan([c.input_length for c in convs], config)
    for g in range(plan.num_batches):
        mb = collate(convs, plan.batch(g), 8, packed=True, document_multiple=8)
        assert mb["tokens"].shape[1] <= 64 and mb["tokens"].numel() <= 256
        assert not bool(((mb["cu_seqlens_padded"][1:] - mb["cu_seqlens_padded"][:-1]) % 8).any())


def _fake_transformer_engine(monkeypatch):
    """TE's thd_get_partitioned_indices, written out: each segment of cu_seqlens_padded in 2*CP chunks, rank r
    taking chunks r and 2*CP-1-r (TE is not installed on CPU machines)."""
    import megatron.core.utils as mcore_utils

    import hcx_megatron.model.spec as spec

    def partitioned_indices(cu_seqlens_padded, total, cp_size, cp_rank):
        index = []
        for start, end in zip(cu_seqlens_padded[:-1].tolist(), cu_seqlens_padded[1:].tolist()):
            chunk = (end - start) // (2 * cp_size)
            for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
                index += range(start + c * chunk, start + (c + 1) * chunk)
        return torch.tensor(index)

    monkeypatch.setattr(mcore_utils, "tex", types.SimpleNamespace(thd_get_partitioned_indices=partitioned_indices))
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda *a, **k: True)
    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: None)


def test_packed_batch_shares_reassemble_per_document(monkeypatch):
    import megatron.core.utils as mcore_utils

    cp = 2
    convs = _conversations([6, 3, 4, 9, 12])
    mb = collate(convs, [[0, 1, 2], [3, 4]], pad_multiple=16, packed=True, document_multiple=2 * cp)
    _fake_transformer_engine(monkeypatch)
    gathered = torch.zeros(mb["tokens"].numel(), dtype=torch.long)
    loss_tokens = 0
    for rank in range(cp):
        _set_cp(monkeypatch, cp, rank)
        share, params = packed_batch_for_transformer_engine(mb)
        assert share["tokens"].shape == (1, mb["tokens"].numel() // cp)
        assert torch.equal(params.cu_seqlens_q, mb["cu_seqlens"]) and torch.equal(params.cu_seqlens_q_padded,
                                                                                    mb["cu_seqlens_padded"])
        index = mcore_utils.tex.thd_get_partitioned_indices(mb["cu_seqlens_padded"], mb["tokens"].numel(), cp, rank)
        gathered[index] = share["tokens"].view(-1)
        loss_tokens += int(share["loss_mask"].sum())
    assert torch.equal(gathered, mb["tokens"].view(-1))
    assert loss_tokens == int(mb["loss_mask"].sum())


def test_packed_context_parallel_without_transformer_engine_is_a_clear_error(monkeypatch, without_transformer_engine):
    mb = collate(_conversations([6, 3]), [[0, 1]], pad_multiple=8, packed=True, document_multiple=4)
    _set_cp(monkeypatch, 2, 0)
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        packed_batch_for_transformer_engine(mb)


def test_sft_flags_refuse_packing_with_context_parallel_without_transformer_engine(tmp_path, without_transformer_engine):
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.sft import SFTOptions, add_sft_args, check_sft_config, options_from_args

    cfg, ns = parse_config(["--device", "cuda", "--tokenizer-model", str(tmp_path), "--data-path", "a.jsonl",
                            "--seq-length", "64", "--context-parallel-size", "2", "--sft-packing"],
                           extra_args=add_sft_args, world_size=2)
    with pytest.raises(ValueError, match="--sft-packing with --context-parallel-size 2 needs Transformer Engine"):
        check_sft_config(cfg, options_from_args(ns, SFTOptions))


def test_generation_refuses_context_parallel(tmp_path):
    """Generation does not split sequences over CP ranks: the SFT eval flag is refused up front, and generate()
    itself refuses a CP model instead of running every rank on the whole prompt."""
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.inference.generate import generate
    from hcx_megatron.sft import SFTOptions, add_sft_args, check_sft_config, options_from_args

    cfg, ns = parse_config(["--device", "cuda", "--tokenizer-model", str(tmp_path), "--data-path", "a.jsonl",
                            "--seq-length", "64", "--context-parallel-size", "2", "--gen-eval-data", "e.jsonl"],
                           extra_args=add_sft_args, world_size=2)
    with pytest.raises(ValueError, match="--gen-eval-data with --context-parallel-size 2"):
        check_sft_config(cfg, options_from_args(ns, SFTOptions))

    class CPModel(torch.nn.Module):
        config = types.SimpleNamespace(context_parallel_size=2)
        max_sequence_length = 64

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="context_parallel_size 2 is not supported"):
        generate([CPModel()], [[1, 2, 3]], max_new_tokens=2)


def test_reward_and_ppo_refuse_pretraining_loader_flags():
    from hcx_megatron.rlhf.common import reject_pretraining_loader_flags

    cfg = types.SimpleNamespace(data=types.SimpleNamespace(dataloader="dali", num_workers=0))
    with pytest.raises(SystemExit, match="hcx-reward: --dataloader dali --num-workers 0: these flags apply to "
                                         "pretraining only"):
        reject_pretraining_loader_flags(cfg, "hcx-reward")
    cfg.data.dataloader, cfg.data.num_workers = "torch", 2
    with pytest.raises(SystemExit, match="--num-workers 2"):
        reject_pretraining_loader_flags(cfg, "hcx-ppo")
    cfg.data.num_workers = 0
    reject_pretraining_loader_flags(cfg, "hcx-ppo")


def test_reward_and_ppo_refuse_context_parallel():
    from hcx_megatron.rlhf.common import reject_context_parallel

    cfg = types.SimpleNamespace(parallel=types.SimpleNamespace(context_parallel_size=2))
    with pytest.raises(SystemExit, match="hcx-ppo: --context-parallel-size 2 is not supported"):
        reject_context_parallel(cfg, "hcx-ppo")
    cfg.parallel.context_parallel_size = 1
    reject_context_parallel(cfg, "hcx-ppo")


# ------------------------------------------------------------------------------ packed SFT steps and masks
def _packed_sft_task(monkeypatch, convs, impl: str):
    from hcx_megatron.sft import SFTOptions, SFTTask

    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda *a, **k: 0)
    _set_cp(monkeypatch, 1, 0)
    task = SFTTask(SFTOptions(packing=True))
    task.cfg = types.SimpleNamespace(num_microbatches=4)
    task.impl, task.pad_multiple, task.train = impl, 8, convs
    task.train_plan = MicroBatchPlan([c.input_length for c in convs],
                                     BatchingConfig(seq_length=48, max_tokens=96, pad_multiple=8, packing=True))
    return task


class _RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, tokens, position_ids, attention_mask, labels=None, packed_seq_params=None):
        self.calls.append({"attention_mask": attention_mask, "packed_seq_params": packed_seq_params})
        return torch.zeros(labels.shape)


def test_packed_step_holds_no_square_masks_and_forward_builds_the_block_causal_mask(monkeypatch):
    convs = _conversations(np.random.default_rng(7).integers(3, 30, size=40).tolist())
    task = _packed_sft_task(monkeypatch, convs, "local")
    step = task.train_batches(0)
    assert len(step.microbatches) == 4
    for mb in step.microbatches:
        assert all(v.dim() <= 2 for v in mb.values()), {k: tuple(v.shape) for k, v in mb.items()}
    model = _RecordingModel()
    for g, mb in enumerate(step.microbatches):
        task.forward_step(iter([mb]), model)
        # The mask the old collate stored: a token sees earlier tokens of its own document; row padding is a
        # segment of its own.
        length = mb["tokens"].shape[1]
        expected = torch.ones(len(task.train_plan.batch(g)), 1, length, length, dtype=torch.bool)
        for r, unit in enumerate(task.train_plan.batch(g)):
            start = 0
            for i in unit:
                n = convs[i].input_length
                expected[r, 0, start:start + n, start:start + n] = ~torch.ones(n, n, dtype=torch.bool).tril()
                start += n
            expected[r, 0, start:, start:] = ~torch.ones(length - start, length - start, dtype=torch.bool).tril()
        assert torch.equal(model.calls[-1]["attention_mask"], expected), g
        assert torch.equal(model.calls[-1]["attention_mask"], block_causal_mask(mb["document_ids"]))


def test_packed_step_on_transformer_engine_builds_no_mask(monkeypatch):
    convs = _conversations(np.random.default_rng(8).integers(3, 30, size=20).tolist())
    task = _packed_sft_task(monkeypatch, convs, "transformer_engine")
    mb = task.train_batches(0).microbatches[0]
    model = _RecordingModel()
    task.forward_step(iter([mb]), model)
    call = model.calls[-1]
    assert call["attention_mask"] is None
    assert torch.equal(call["packed_seq_params"].cu_seqlens_q, mb["cu_seqlens"])


def test_throughput_per_gpu_is_what_each_cp_rank_holds(monkeypatch):
    """The loop reports global tokens (each sequence counted once) over the whole world (TP x PP x CP x DP): under
    CP that is exactly the tokens one rank holds, and model FLOPs at the full sequence length are shared evenly
    (the load-balanced split above)."""
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.training.metrics import step_throughput

    cfg, _ = parse_config(["--device", "cpu", "--mock-data", "--model-preset", "hcx-tiny", "--seq-length", "64"],
                          world_size=1)
    dp, cp, micro_batch, global_batch, seq, seconds = 2, 4, 2, 16, 64, 0.5
    microbatches_per_rank = global_batch // (micro_batch * dp)
    shares = _cp_shares(monkeypatch, _batch(rows=micro_batch, length=seq), cp)
    tokens_per_rank = microbatches_per_rank * shares[0]["tokens"].numel()
    r = step_throughput(cfg, seq, global_batch * seq, seconds, dp * cp)
    assert r["tokens_per_sec_per_gpu"] * seconds == pytest.approx(tokens_per_rank)
    assert r["tokens_per_sec"] * seconds == global_batch * seq
