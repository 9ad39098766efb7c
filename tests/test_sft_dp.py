"""Per-token loss averaging across micro-batches and data-parallel ranks: the same global batch trained as
DP=1 x 4 micro-batches and as DP=2 x 2 micro-batches gives the same losses step after step. Token-budget
micro-batches hold different numbers of assistant tokens, so averaging per micro-batch or per rank (instead of
per token over the whole step) would make the two runs diverge from the first step on."""

from __future__ import annotations

import json
import random

import pytest
from torchrun_utils import torchrun

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`


def _write_chat_data(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ["data", "file", "code", "book", "test", "time", "user", "path", "name", "size"]
    with open(path, "w") as f:
        for _ in range(n):
            ws = [rng.choice(words) for _ in range(rng.randint(1, 12))]
            f.write(json.dumps({"messages": [{"role": "user", "content": "sort: " + " ".join(ws)},
                                             {"role": "assistant", "content": " " + " ".join(sorted(ws))}]}) + "\n")


@pytest.mark.timeout(600)
def test_dp1_and_dp2_train_identically(tiny_tokenizer_dir, tmp_path):
    _write_chat_data(tmp_path / "train.jsonl", 200, 0)
    losses = {}
    for nproc in (1, 2):
        metrics = tmp_path / f"dp{nproc}.jsonl"
        torchrun("hcx_megatron.sft", nproc=nproc, timeout=500, args=[
            "--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir, "--data-path", str(tmp_path / "train.jsonl"),
            "--split", "1,0,0", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--sft-tokens-per-microbatch", "96", "--train-iters", "4", "--lr", "3e-3",
            "--log-interval", "100", "--metrics-jsonl", str(metrics),
            "--sft-data-report", str(tmp_path / f"report{nproc}.json")])
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        losses[nproc] = [(r["lm_loss"], r["user_loss"], r["tokens_per_sec"] * r["step_time_s"])
                         for r in records if r["kind"] == "train"]
    assert len(losses[1]) == len(losses[2]) == 4
    report = json.loads((tmp_path / "report2.json").read_text())
    assert report["train"]["read"] == report["train"]["kept"] == report["num_train"] == 200
    for step, (a, b) in enumerate(zip(losses[1], losses[2])):
        assert a[2] == pytest.approx(b[2]), "both layouts must see the same global batch"
        # Measured: equal to ~1e-8 (only the order of the gradient sums differs).
        assert a[0] == pytest.approx(b[0], rel=1e-5), (step, losses)
        assert a[1] == pytest.approx(b[1], rel=1e-5), (step, losses)
    assert losses[1][-1][0] < losses[1][0][0]  # and it trains
