"""Reward model: Bradley-Terry on a synthetic preference task with a hidden rule (more "apple"s = better),
real torchrun processes on CPU (TP2 + sequence parallel, so the scalar head runs TP-aware), backbone from a
pretrain checkpoint standing in for SFT, calibration stored with the checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from hcx_megatron.rlhf.synthetic import read_jsonl


def _tail(proc) -> str:
    return (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:])


@pytest.mark.dist
@pytest.mark.timeout(420)
def test_reward_model_learns_hidden_rule(trained_reward_model):
    proc, rm, metrics = trained_reward_model.proc, trained_reward_model.rm, trained_reward_model.metrics
    assert proc.returncode == 0, _tail(proc)
    assert "weights only; fresh: " in proc.stdout and "value_head.weight" in proc.stdout  # SFT init, fresh head

    records = read_jsonl(metrics)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    # 1 epoch by default: 540 training prompts / 16 per step.
    assert len(train) == 540 // 16
    assert train[0]["pair_acc"] < 0.9  # it starts near chance: the accuracy below is learnt
    assert evals and evals[-1]["iteration"] == len(train)
    assert evals[-1]["pair_acc"] >= 0.9, evals
    assert evals[-1]["rm_loss"] < train[0]["rm_loss"]

    # Calibration statistics: logged, and stored with the final checkpoint (extra state, common.pt).
    (cal,) = [r for r in records if r.get("event") == "reward_calibration"]
    assert cal["count"] > 0 and cal["std"] > 0
    common = torch.load(os.path.join(rm, f"iter_{len(train):07d}", "common.pt"), weights_only=False)
    stored = common["extra"]["reward_calibration"]
    assert stored["mean"] == pytest.approx(cal["mean"]) and stored["std"] == pytest.approx(cal["std"])
    assert common["extra"]["reward_clip"] == 5.0


@pytest.mark.timeout(30)
def test_calibration_normalises_and_clips():
    from hcx_megatron.rlhf.reward import Calibration, bradley_terry_terms

    cal = Calibration(mean=2.0, std=4.0)
    out = cal.normalise(torch.tensor([2.0, 6.0, 100.0, -100.0]), clip=3.0)
    assert out.tolist() == [0.0, 1.0, 3.0, -3.0]
    # BT: -log sigmoid(margin), accuracy = margin > 0. Margins +1 and -2:
    loss, correct = bradley_terry_terms(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0, 2]), torch.tensor([1, 1]))
    assert torch.allclose(loss, torch.tensor([0.31326169, 1.31326169]))
    assert correct.tolist() == [1.0, 0.0]


@pytest.mark.timeout(30)
def test_preference_parsing_and_batching(tmp_path):
    from hcx_megatron.data.preference import (PreferenceBatcher, PreferenceDataError, PreferenceExample, collate,
                                              ranking_pairs, read_preference_jsonl)

    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 1]}\n'
                   '{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 0]}\n')
    with pytest.raises(PreferenceDataError, match=r"bad.jsonl:2: 'ranking'"):
        read_preference_jsonl(str(bad))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    (_, (msgs, responses, ranking)), = read_preference_jsonl(str(pairs))
    assert msgs == [{"role": "user", "content": "hi"}] and responses == ["a", "b"] and ranking == [0, 1]

    ex = [PreferenceExample([[1, 2, 3], [1, 2]], [(0, 1)]),
          PreferenceExample([[4], [5, 6], [7]], [(2, 0), (2, 1), (0, 1)])]
    b = collate(ex, pad_id=9, multiple_of=4)
    assert b["tokens"].tolist() == [[1, 2, 3, 9], [1, 2, 9, 9], [4, 9, 9, 9], [5, 6, 9, 9], [7, 9, 9, 9]]
    assert b["lengths"].tolist() == [3, 2, 1, 2, 1]
    # all comparisons of a prompt in the same micro-batch, offsets shifted per prompt
    assert b["better"].tolist() == [0, 4, 4, 2] and b["worse"].tolist() == [1, 2, 3, 3]

    many = [PreferenceExample([[i], [i + 1]], [(0, 1)]) for i in range(10)]
    r0 = PreferenceBatcher(many, 4, 1, 0, 2, seed=3, pad_id=0)
    r1 = PreferenceBatcher(many, 4, 1, 1, 2, seed=3, pad_id=0)
    assert r0.steps_per_epoch == 2
    step0 = r0.step_examples(0) + r1.step_examples(0)
    step1 = r0.step_examples(1) + r1.step_examples(1)
    assert len({id(e) for e in step0 + step1}) == 8  # DP shards and steps of one epoch are disjoint
    assert r0.step_examples(2) is not None and r0.step_examples(0) == r0.step_examples(0)  # deterministic
