"""Packing must not change what the model computes: per-token losses of conversations packed into one row
(block-causal mask, per-document positions) equal those of each conversation alone, through the real GPTModel;
and through the SFT driver at PP=2 the validation loss of a packed run equals the unpacked one.

Run as a script, this file is the single-process worker of the first test (launched with torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torchrun_utils import free_port

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _worker(out_path: str) -> None:
    import numpy as np
    import torch

    from hcx_megatron.config.args import parse_config
    from hcx_megatron.data.sft_dataset import Conversation, block_causal_mask, collate
    from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
    from hcx_megatron.model.builder import build_model

    cfg, _ = parse_config(["--mock-data", "--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
                           "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
                           "--vocab-size", "512", "--seed", "3"])
    _, device = initialize_distributed(cfg)
    model = build_model(cfg, device, wrap_ddp=False).chunks[0].eval()
    rng = np.random.default_rng(0)
    convs = [Conversation(rng.integers(10, 512, n).astype(np.int32), np.ones(n, np.uint8), np.zeros(n, np.uint8), "x")
             for n in (9, 14, 6)]

    def losses(mb, mask=True):
        with torch.no_grad():
            attention_mask = block_causal_mask(mb["document_ids"]) if mask else None  # as SFTTask.forward_step
            out = model(mb["tokens"], mb["position_ids"], attention_mask, labels=mb["labels"])
        return out.float()

    alone = [losses(collate(convs, [[i]], 1, packed=True))[0, : c.input_length]
             for i, c in enumerate(convs)]
    packed_mb = collate(convs, [[0, 1, 2]], 8, packed=True)
    packed, unmasked = losses(packed_mb)[0], losses(packed_mb, mask=False)[0]
    diffs, control = [], []
    start = 0
    for c, ref in zip(convs, alone):
        n = c.input_length
        diffs.append(float((packed[start:start + n] - ref).abs().max()))
        control.append(float((unmasked[start:start + n] - ref).abs().max()))
        start += n
    with open(out_path, "w") as f:
        json.dump({"diffs": diffs, "control": control}, f)
    shutdown()


@pytest.mark.timeout(300)
def test_packed_losses_equal_unpacked_through_gptmodel(tmp_path):
    out = tmp_path / "packing.json"
    _torchrun([os.path.abspath(__file__), str(out)], nproc=1)
    result = json.loads(out.read_text())
    assert max(result["diffs"]) < 1e-4, result
    # Control: without the block-causal mask, later documents see earlier ones and their losses change.
    assert result["control"][0] < 1e-4 and min(result["control"][1:]) > 1e-3, result


def _write_chat_data(path, n: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    words = ["data", "file", "code", "book", "test", "time", "user", "path"]
    with open(path, "w") as f:
        for _ in range(n):
            ws = rng.sample(words, rng.randint(2, 6))
            f.write(json.dumps({"messages": [{"role": "user", "content": "sort: " + " ".join(ws)},
                                             {"role": "assistant", "content": " " + " ".join(sorted(ws))}]}) + "\n")


@pytest.mark.timeout(600)
def test_driver_pp2_packed_validation_loss_equals_unpacked(tiny_tokenizer_dir, tmp_path):
    """lr 0: the weights stay at their (layout-independent) initial values, so the validation loss depends only
    on which tokens are scored, which packing must not change."""
    _write_chat_data(tmp_path / "train.jsonl", 64, 0)
    _write_chat_data(tmp_path / "valid.jsonl", 40, 1)
    common = ["-m", "hcx_megatron.sft", "--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir,
              "--data-path", str(tmp_path / "train.jsonl"), "--valid-data-path", str(tmp_path / "valid.jsonl"),
              "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--pipeline-model-parallel-size", "2", "--seq-length", "64",
              "--micro-batch-size", "1", "--global-batch-size", "2", "--sft-tokens-per-microbatch", "128",
              "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "100", "--lr", "0", "--min-lr", "0",
              "--log-interval", "100"]
    evals = {}
    for name, extra in (("plain", []), ("packed", ["--sft-packing"])):
        metrics = tmp_path / f"{name}.jsonl"
        _torchrun([*common, "--metrics-jsonl", str(metrics), *extra], nproc=2)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        evals[name] = [r for r in records if r["kind"] == "eval"][-1]
    assert evals["plain"]["lm_loss"] == pytest.approx(evals["packed"]["lm_loss"], rel=1e-4)
    assert evals["plain"]["user_loss"] == pytest.approx(evals["packed"]["user_loss"], rel=1e-4)


if __name__ == "__main__":
    _worker(sys.argv[1])
