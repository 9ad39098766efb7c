"""SFT data: bad-input reporting, truncation, token-budget batching, packing, collation and the loss function
(all single-process, no torch.distributed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hcx_megatron.data.chat import render_ids
from hcx_megatron.data.sft_dataset import (
    BatchingConfig, Conversation, MicroBatchPlan, SFTDataError, block_causal_mask, budget_batches, collate,
    fit_conversation, pack_rows, read_conversations, round_up, split_fractions, split_train_valid,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from hcx_megatron.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def conv(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


@pytest.mark.timeout(60)
def test_bad_lines_are_counted_with_file_and_line(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps(conv("hi", "hello")),                                        # 1 ok
        '{"messages": [',                                                       # 2 invalid json
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),          # 3 unknown role
        json.dumps({"messages": []}),                                           # 4 empty
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 5 no assistant
        "",                                                                     # 6 blank: skipped
        json.dumps(conv("long " * 200, "x")),                                   # 7 too long
        json.dumps(["not", "an", "object"]),                                    # 8 bad messages
        json.dumps({"messages": [{"role": "user", "content": 3}]}),             # 9 bad content
        json.dumps(conv("again", "fine")),                                      # 10 ok
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"messages": "\xff\xfe"}\n'   # 11 invalid utf-8
    path.write_bytes(raw)
    convs, report = read_conversations([str(path)], tok, max_length=64)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:10"]
    assert report.read == 10 and report.kept == 2
    assert report.rejected == {"invalid_json": 1, "unknown_role": 1, "empty_conversation": 1,
                               "no_assistant_tokens": 1, "too_long": 1, "bad_messages": 1, "bad_content": 1,
                               "invalid_utf8": 1}
    for reason, line in (("invalid_json", 2), ("unknown_role", 3), ("too_long", 7), ("invalid_utf8", 11)):
        assert report.examples[reason][0].startswith(f"{path}:{line}:"), report.examples[reason]
    assert f"{path}:5" in report.summary()
    with pytest.raises(SFTDataError, match=f"{path}:2"):
        read_conversations([str(path)], tok, max_length=64, strict=True)
    with pytest.raises(FileNotFoundError, match="--data-path"):
        read_conversations([str(tmp_path / "missing.jsonl")], tok, max_length=64)


@pytest.mark.timeout(60)
def test_truncation_drops_oldest_exchanges_keeps_system(tok):
    msgs = [{"role": "system", "content": "sys"}]
    for k in range(4):
        msgs += [{"role": "user", "content": f"question number {k} " * 3},
                 {"role": "assistant", "content": f"answer {k} " * 3}]
    full = render_ids(tok, msgs)
    tail = [msgs[0]] + msgs[-2:]
    limit = len(render_ids(tok, tail)) + 2  # room for the last exchange only
    rendered, truncated = fit_conversation(tok, msgs, limit)
    assert truncated and rendered.ids == render_ids(tok, tail).ids
    assert rendered.loss_mask == render_ids(tok, tail).loss_mask
    same, truncated = fit_conversation(tok, msgs, len(full))
    assert not truncated and same.ids == full.ids
    from hcx_megatron.data.chat import ChatFormatError

    with pytest.raises(ChatFormatError, match="too_long"):
        fit_conversation(tok, msgs, limit, truncation="none")
    with pytest.raises(ChatFormatError, match="too_long"):  # the last exchange alone does not fit
        fit_conversation(tok, msgs, limit - 4)


@pytest.mark.timeout(60)
def test_token_budget_is_never_exceeded():
    rng = np.random.default_rng(0)
    for trial in range(30):
        lengths = rng.integers(1, 200, size=int(rng.integers(1, 400))).tolist()
        budget = int(rng.integers(200, 2000))
        pad = int(rng.choice([1, 8, 16]))
        if round_up(200, pad) > budget:
            continue
        batches = budget_batches(lengths, budget, 1, pad, np.random.default_rng(trial))
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) * round_up(max(lengths[i] for i in b), pad) <= budget
        # Length grouping: with sorted greedy cutting, batches cover disjoint length ranges (up to ties).
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1))
    fixed = budget_batches([5, 1, 9, 3, 7], None, 2, 1, None)
    assert fixed == [[1, 3], [0, 4], [2]]


@pytest.mark.timeout(60)
def test_pack_rows_capacity_and_coverage():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, size=500).tolist()
    rows = pack_rows(lengths, 128, np.random.default_rng(2))
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    lower_bound = -(-sum(lengths) // 128)
    assert len(rows) <= int(lower_bound * 1.15) + 1, (len(rows), lower_bound)  # best-fit decreasing packs tightly
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 300], 128, None)


def _fake_conversations(lengths, seed=0) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = rng.integers(20, 500, size=n).astype(np.int32)
        loss = (rng.random(n) < 0.5).astype(np.uint8)
        loss[-1] = 1
        user = ((1 - loss) * (rng.random(n) < 0.5)).astype(np.uint8)
        out.append(Conversation(ids, loss, user, f"fake:{k}"))
    return out


@pytest.mark.timeout(60)
def test_collated_microbatches_respect_budget_packed_and_not():
    convs = _fake_conversations(np.random.default_rng(3).integers(3, 60, size=300).tolist())
    for packing in (False, True):
        cfg = BatchingConfig(seq_length=64, max_tokens=256, rows_per_batch=1, pad_multiple=8, packing=packing, seed=5)
        plan = MicroBatchPlan([c.input_length for c in convs], cfg)
        seen = []
        for g in range(plan.num_batches):
            mb = collate(convs, plan.batch(g), 8, packed=packing)
            assert mb["tokens"].numel() <= 256 and mb["tokens"].shape[1] % 8 == 0
            assert mb["tokens"].shape[1] <= 64
            seen += [i for unit in plan.batch(g) for i in unit]
        assert sorted(seen) == list(range(len(convs)))  # one epoch = every conversation once
        assert plan.batch(0) == MicroBatchPlan([c.input_length for c in convs], cfg).batch(0)  # deterministic
        assert plan.epoch(0) != plan.epoch(1)  # reshuffled per epoch


@pytest.mark.timeout(60)
def test_packed_row_positions_labels_and_block_causal_mask():
    convs = _fake_conversations([5, 3, 4])
    mb = collate(convs, [[0, 1, 2]], pad_multiple=16, packed=True)
    assert mb["tokens"].shape == (1, 16)
    assert mb["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    # Labels are each document's own next tokens: never the first token of the next document.
    expected_labels = np.concatenate([c.ids[1:] for c in convs])
    assert mb["labels"][0, :9].tolist() == expected_labels.tolist()
    assert mb["loss_mask"][0, 9:].sum() == 0 and mb["user_mask"][0, 9:].sum() == 0
    doc = [0, 0, 0, 0, 1, 1, 2, 2, 2] + [-1] * 7
    assert mb["document_ids"][0].tolist() == doc
    mask = block_causal_mask(mb["document_ids"])[0, 0]
    for q in range(16):
        for k in range(16):
            allowed = k <= q and doc[q] == doc[k]
            assert bool(mask[q, k]) == (not allowed), (q, k)
    assert not mask.all(dim=-1).any()  # every row (pads included) attends to something: no NaN softmax
    assert mb["cu_seqlens"].tolist() == mb["cu_seqlens_padded"].tolist() == [0, 4, 6, 9, 16]
    two_rows = collate(convs, [[0], [1, 2]], pad_multiple=1, packed=True)
    assert two_rows["cu_seqlens"].tolist() == two_rows["cu_seqlens_padded"].tolist() == [0, 4, 5, 7, 10]
    assert torch.equal(block_causal_mask(torch.zeros(1, 4, dtype=torch.long))[0, 0], ~torch.ones(4, 4).tril().bool())


@pytest.mark.timeout(60)
def test_loss_func_trains_assistant_tokens_only():
    from hcx_megatron.sft import sft_loss_func

    torch.manual_seed(0)
    per_token = torch.rand(3, 7, requires_grad=True)
    loss_mask = (torch.rand(3, 7) < 0.4).float()
    user_mask = ((torch.rand(3, 7) < 0.5).float() * (1 - loss_mask))
    loss_sum, count, metrics = sft_loss_func(loss_mask, user_mask, per_token)
    loss_sum.backward()
    assert torch.equal(per_token.grad, loss_mask)  # zero gradient on every user and non-assistant position
    assert int(count) == int(loss_mask.sum())
    assert torch.allclose(metrics["user loss"], torch.stack([(per_token * user_mask).sum(), user_mask.sum()]))
    assert not metrics["user loss"].requires_grad


@pytest.mark.timeout(60)
def test_split_helpers():
    assert split_fractions("969,30,1") == pytest.approx((0.03, 0.001))
    train, valid = split_train_valid(1000, 0.1, seed=7)
    assert sorted(train + valid) == list(range(1000)) and 60 < len(valid) < 140
    assert split_train_valid(1000, 0.1, seed=7) == (train, valid)
    with pytest.raises(ValueError, match="--split"):
        split_fractions("a,b")


@pytest.mark.timeout(60)
def test_flag_checks(tmp_path):
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.sft import SFTOptions, add_sft_args, check_sft_config, options_from_args

    def check(*extra):
        cfg, ns = parse_config(["--device", "cpu", "--tokenizer-model", str(tmp_path), "--seq-length", "64", *extra],
                               extra_args=add_sft_args, world_size=1)
        check_sft_config(cfg, options_from_args(ns, SFTOptions))

    check("--data-path", "a.jsonl", "--sft-tokens-per-microbatch", "64")
    with pytest.raises(ValueError, match="--sft-tokens-per-microbatch"):
        check("--data-path", "a.jsonl", "--sft-tokens-per-microbatch", "32")
    with pytest.raises(ValueError, match="blend weight"):
        check("--data-path", "0.5", "a.jsonl")
    with pytest.raises(ValueError, match="--mock-data"):
        check("--mock-data")
