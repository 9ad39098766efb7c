"""Generation utility: sampling primitives (pure), and the same tokens / logprobs from one process and from
TP=2 x PP=2 (four torchrun processes on gloo) for the same seed, greedy and sampled, with stop ids.

Run as a script, this file is the worker: it builds a randomly initialised tiny model (initialisation is
layout-independent, so every layout holds the same weights) and generates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40], [41, 42]]


@pytest.mark.timeout(60)
def test_top_p_keeps_the_smallest_nucleus():
    from hcx_megatron.inference.generate import top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert kept(1e-6) == [True, False, False, False]  # always at least the most likely token
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.6))[0].tolist() == [False, True, False, True]


@pytest.mark.timeout(60)
def test_choose_next_greedy_and_seeded_sampling():
    from hcx_megatron.inference.generate import choose_next

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    assert torch.equal(choose_next(logits, 0.0, 1.0, [None] * 3), logits.argmax(-1))
    assert torch.equal(choose_next(logits, 1.0, 1e-6, [torch.Generator().manual_seed(i) for i in range(3)]),
                       logits.argmax(-1))
    a = choose_next(logits, 0.8, 0.9, [torch.Generator().manual_seed(i) for i in range(3)])
    b = choose_next(logits, 0.8, 0.9, [torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(a, b)
    # Padded vocabulary columns (probability 0) do not change the draw: layouts with different padding agree.
    padded = torch.cat([logits, torch.full((3, 14), float("-inf"))], dim=-1)
    c = choose_next(padded, 0.8, 0.9, [torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(a, c)
    # Frequencies follow softmax(logits / T).
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose_next(row, 0.5, 1.0, [g])[0]] += 1
    expected = torch.softmax(row[0] / 0.5, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.03), (counts / 4000, expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_layout(out_path: str, tp: int, pp: int) -> dict:
    nproc = tp * pp
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
           os.path.abspath(__file__), out_path, str(tp), str(pp)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out_path) as f:
        return json.load(f)


@pytest.mark.timeout(900)
def test_same_generations_at_tp1_and_tp2_pp2(tmp_path):
    ref = _run_layout(str(tmp_path / "tp1.json"), 1, 1)
    par = _run_layout(str(tmp_path / "tp2pp2.json"), 2, 2)
    assert [len(t) for t in ref["greedy"]] == [8] * len(PROMPTS)
    assert par["greedy"] == ref["greedy"]
    assert par["sampled"] == ref["sampled"]
    assert ref["sampled"] != ref["greedy"]
    for a, b in zip(ref["greedy_logprobs"], par["greedy_logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert all(lp <= 0 for row in ref["greedy_logprobs"] for lp in row)
    # Stop ids: the response ends with the first stop token and is marked finished; others run to the limit.
    stop = ref["stop_id"]
    for full, cut, done in zip(ref["greedy"], ref["stopped"], ref["stopped_finished"]):
        if stop in full:
            assert cut == full[: full.index(stop) + 1] and done
        else:
            assert cut == full and not done
    assert par["stopped"] == ref["stopped"]


def _worker(out_path: str, tp: int, pp: int) -> None:
    import torch.distributed as dist

    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
    from hcx_megatron.inference.generate import generate
    from hcx_megatron.model.builder import build_model

    cfg, _ = parse_config(["--mock-data", "--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
                           "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
                           "--vocab-size", "300", "--seed", "7", "--tensor-model-parallel-size", str(tp),
                           "--pipeline-model-parallel-size", str(pp)])
    _, device = initialize_distributed(cfg)
    chunks = build_model(cfg, device, wrap_ddp=False).chunks
    greedy = generate(chunks, PROMPTS, 8, stop_ids=[], vocab_size=300, return_logprobs=True)
    sampled = generate(chunks, PROMPTS, 8, temperature=1.0, top_p=0.9, stop_ids=[], seed=5, vocab_size=300)
    stop_id = greedy.tokens[0][3]
    stopped = generate(chunks, PROMPTS, 8, stop_ids=[stop_id], vocab_size=300)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"greedy": greedy.tokens, "greedy_logprobs": greedy.logprobs, "sampled": sampled.tokens,
                       "stop_id": stop_id, "stopped": stopped.tokens, "stopped_finished": stopped.finished}, f)
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
