"""The real data path of the pretraining driver: weighted Megatron blends, FIM, the HCX long-context switch."""

import pytest

from hcx_megatron.data.gpt_datasets import validate_blend_paths
from torchrun_utils import pretrain, read_metrics


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_weighted_blend_fim_and_long_context_switch(tmp_path, tiny_tokenizer_dir, tiny_indexed_dataset):
    metrics = tmp_path / "m.jsonl"
    pretrain(["--model-preset", "hcx-tiny", "--tokenizer-model", tiny_tokenizer_dir,
              "--data-path", "0.7", tiny_indexed_dataset, "0.3", tiny_indexed_dataset, "--split", "90,10,0",
              "--fim-rate", "0.5", "--fim-spm-rate", "0.5",
              "--seq-length", "64", "--long-context-seq-length", "128", "--long-context-start-fraction", "0.5",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
              "--eval-interval", "2", "--eval-iters", "1", "--metrics-jsonl", str(metrics),
              "--tensorboard-dir", str(tmp_path / "tb"),
              "--tensor-model-parallel-size", "2"], nproc=2)
    train = read_metrics(str(metrics))
    # HCX context schedule: the first half at 64 tokens, the rest at 128.
    assert [r["seq_length"] for r in train] == [64, 64, 128, 128]
    assert all(r["lm_loss"] > 0 and r["tokens_per_sec"] > 0 for r in train)
    assert len(read_metrics(str(metrics), kind="eval")) == 2
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_bf16_run_tracks_fp32(tmp_path):
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        metrics = tmp_path / f"{name}.jsonl"
        pretrain(["--mock-data", "--model-preset", "hcx-tiny", "--seq-length", "64", "--micro-batch-size", "2",
                  "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--metrics-jsonl", str(metrics),
                  *extra], nproc=1)
        losses[name] = [r["lm_loss"] for r in read_metrics(str(metrics))]
    # bf16 weights/activations with fp32 master weights: close to fp32, not equal.
    assert losses["bf16"] != losses["fp32"]
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) / a < 2e-2, losses


def test_missing_prefix_is_named():
    with pytest.raises(FileNotFoundError, match="--data-path: dataset prefix 'nope/ko_text_document'"):
        validate_blend_paths(["0.5", "nope/ko_text_document"])


def test_empty_split_parts_fail_clearly_instead_of_hanging(tiny_indexed_dataset):
    from hcx_megatron.data.gpt_datasets import check_split_coverage

    # Megatron's default split leaves the test part of a small dataset empty: fine while nothing samples it...
    check_split_coverage([tiny_indexed_dataset], "969,30,1", (True, False, False))
    # ...but a weighted blend must size every part, and a needed validation part must exist.
    with pytest.raises(ValueError, match="--split 969,30,1: the test part"):
        check_split_coverage(["0.5", tiny_indexed_dataset, "0.5", tiny_indexed_dataset], "969,30,1",
                             (True, False, False))
    with pytest.raises(ValueError, match="the validation part"):
        check_split_coverage([tiny_indexed_dataset], "9999,1,0", (True, True, False))
