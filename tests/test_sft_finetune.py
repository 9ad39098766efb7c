"""`--load PRETRAIN --finetune`: SFT starts from pretrained weights (not from its own initialisation) with a
fresh iteration count, in another layout (pretrain TP1 -> SFT PP2), and a bad --sft-strict input
fails the driver naming file and line."""

from __future__ import annotations

import json

import pytest
from torchrun_utils import torchrun

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "64", "--device", "cpu", "--log-interval", "100"]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.timeout(900)
def test_finetune_from_pretrain_checkpoint_in_another_layout(tiny_tokenizer_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for k in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {k}"},
                                             {"role": "assistant", "content": f" {k + 1}"}]}) + "\n")
    tok = ["--tokenizer-model", tiny_tokenizer_dir]
    # Pretraining with a different seed: its weights differ from what SFT would initialise itself.
    torchrun("hcx_megatron.pretrain", [*MODEL, *tok, "--mock-data", "--seed", "99", "--micro-batch-size", "2",
                                        "--global-batch-size", "4", "--train-iters", "2", "--save",
                                        str(tmp_path / "pre")], nproc=1)
    sft = [*MODEL, *tok, "--data-path", str(data), "--split", "1,0,0", "--micro-batch-size", "4",
           "--global-batch-size", "8", "--train-iters", "2", "--lr", "0", "--min-lr", "0",
           "--pipeline-model-parallel-size", "2"]
    torchrun("hcx_megatron.sft", [*sft, "--load", str(tmp_path / "pre"), "--finetune", "--save",
                                   str(tmp_path / "sft"), "--metrics-jsonl", str(tmp_path / "ft.jsonl")], nproc=2)
    ft = _records(tmp_path / "ft.jsonl")
    load = [r for r in ft if r.get("event") == "load"]
    assert load and load[0]["finetune"] and load[0]["iteration"] == 0
    assert [r["iteration"] for r in ft if r["kind"] == "train"] == [1, 2]  # fresh iteration count
    # lr 0: the SFT checkpoint must hold exactly the pretrained weights (seed 99), not SFT's own init (1234).
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for name in ("pre", "sft"):
        dcp_to_torch_save(str(tmp_path / name / "iter_0000002"), str(tmp_path / f"{name}.pt"))
    pre, sft_w = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("pre", "sft"))
    for key in ("embedding.word_embeddings.weight", "decoder.layers.self_attention.linear_qkv.weight",
                "output_layer.weight"):
        assert torch.equal(pre[key], sft_w[key]), key
    assert open(tmp_path / "sft" / "latest_checkpointed_iteration.txt").read().strip() == "2"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    proc = torchrun("hcx_megatron.sft", [*sft[:-2], "--data-path", str(bad), "--sft-strict"], nproc=1, check=False)
    assert proc.returncode != 0
    assert f"{bad}:41" in proc.stdout + proc.stderr and "unknown_role" in proc.stdout + proc.stderr
