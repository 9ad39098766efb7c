"""Learning test: a tiny model SFT'd at TP=2 (two real torchrun processes on gloo) on "reverse these 4 words"
reaches >= 90% exact match with greedy generation on held-out word orders, its assistant-token loss falls,
and the user-token loss (measured, never trained) does not. The checkpoint then answers through `hcx-chat`
in another layout (TP=1), which also proves checkpoints reshard for inference."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from torchrun_utils import free_port

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["data", "file", "code", "book", "test", "time", "user", "path", "name", "size", "value", "error",
         "start", "open", "read", "work"]


def reverse_task(out_dir: str, n_train: int = 4000, n_heldout: int = 64, seed: int = 0) -> tuple[str, str]:
    """Chat JSONL for 'reverse: w1 w2 w3 w4' -> ' w4 w3 w2 w1'; held-out word orders never appear in train."""
    rng = random.Random(seed)

    def example(ws):
        return {"messages": [{"role": "user", "content": "reverse: " + " ".join(ws)},
                             {"role": "assistant", "content": " " + " ".join(reversed(ws))}]}

    held: dict[tuple, dict] = {}
    while len(held) < n_heldout:
        ws = tuple(rng.sample(WORDS, 4))
        held.setdefault(ws, example(ws))
    train_path, held_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    with open(train_path, "w") as f:
        written = 0
        while written < n_train:
            ws = tuple(rng.sample(WORDS, 4))
            if ws not in held:
                f.write(json.dumps(example(ws)) + "\n")
                written += 1
    with open(held_path, "w") as f:
        for ex in held.values():
            f.write(json.dumps(ex) + "\n")
    return train_path, held_path


@pytest.fixture(scope="module")
def sft_run(tiny_tokenizer_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sft_learning")
    train, heldout = reverse_task(str(work))
    metrics, gen_out, ckpt = work / "metrics.jsonl", work / "gen_eval.json", work / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "hcx_megatron.sft", "--device", "cpu", "--tensor-model-parallel-size", "2",
           "--tokenizer-model", tiny_tokenizer_dir, "--data-path", train, "--split", "95,5,0",
           "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
           "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "16", "--global-batch-size", "32",
           "--sft-tokens-per-microbatch", "512", "--train-iters", "350", "--lr", "3e-3", "--min-lr", "3e-4",
           "--lr-warmup-iters", "20", "--eval-interval", "50", "--eval-iters", "100", "--log-interval", "50",
           "--metrics-jsonl", str(metrics), "--save", str(ckpt),
           "--gen-eval-data", heldout, "--gen-max-new-tokens", "8", "--gen-eval-output", str(gen_out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"records": records, "gen": json.loads(gen_out.read_text()), "ckpt": str(ckpt), "heldout": heldout,
            "stdout": proc.stdout}


@pytest.mark.timeout(1300)
def test_reverse_words_learned_at_tp2(sft_run):
    gen = sft_run["gen"]
    assert gen["num_prompts"] == 64
    assert gen["exact_match"] >= 0.9, json.dumps(gen["samples"][:8], indent=1)
    train = [r for r in sft_run["records"] if r["kind"] == "train"]
    evals = [r for r in sft_run["records"] if r["kind"] == "eval"]
    assert len(train) == 350 and len(evals) == 7
    first, last = train[:10], train[-10:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    # Assistant-token loss falls (train and validation).
    assert mean(last, "lm_loss") < 0.1 * mean(first, "lm_loss"), (mean(first, "lm_loss"), mean(last, "lm_loss"))
    assert evals[-1]["lm_loss"] < 0.3 * evals[0]["lm_loss"]
    # User tokens are never optimised: their loss does not fall (it drifts up as the model specialises),
    # whereas training on them would drive it far below its initial ~ln(vocab) (the prompts are 16 words
    # and a fixed "reverse:" prefix).
    assert mean(last, "user_loss") > 0.9 * mean(first, "user_loss"), (mean(first, "user_loss"), mean(last, "user_loss"))
    assert evals[-1]["user_loss"] > 10 * evals[-1]["lm_loss"]
    assert "[sft] train data: read 4000 conversations, kept 4000" in sft_run["stdout"]


@pytest.mark.timeout(300)
def test_hcx_chat_answers_from_the_tp2_checkpoint_at_tp1(sft_run, tiny_tokenizer_dir):
    with open(sft_run["heldout"]) as f:
        example = json.loads(f.readline())
    user, reference = example["messages"][0]["content"], example["messages"][1]["content"]
    cmd = [sys.executable, "-m", "hcx_megatron.inference.chat", "--load", sft_run["ckpt"], "--device", "cpu",
           "--prompt", user, "--max-new-tokens", "8", "--json"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 1 and answers[0]["finished"]
    assert answers[0]["assistant"].strip() == reference.strip()
