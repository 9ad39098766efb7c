"""Synthetic RLHF data with known answers (tests, CPU demos): preference data whose better response follows a
hidden rule, PPO prompt files and rule rewards. (Tests launch processes with tests/torchrun_utils.py.)"""

from __future__ import annotations

import json
import random
import socket

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "and", "big", "red", "house", "we", "saw",
         "a", "tree", "blue", "sky", "day"]
KEYWORD = "apple"  # hidden rule: more "apple"s = better response


def _response(rng: random.Random, n_keyword: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
    for _ in range(n_keyword):
        words.insert(rng.randint(0, len(words)), KEYWORD)
    return " ".join(words)


def write_preference_jsonl(path: str, n: int, seed: int) -> None:
    """Each prompt has 2 or 3 responses with 0/1/2 keywords (distinct counts); ranking = most keywords first."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k = rng.choice([2, 3])
            counts = rng.sample([0, 1, 2], k)
            responses = [_response(rng, c) for c in counts]
            ranking = sorted(range(k), key=lambda i: -counts[i])
            prompt = [{"role": "user", "content": "say something about " + rng.choice(WORDS)}]
            f.write(json.dumps({"prompt": prompt, "responses": responses, "ranking": ranking}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prompt_ids_jsonl(path: str, n: int, vocab: int, length: int, seed: int) -> None:
    """PPO prompts given as ids ({"prompt_ids": [...]}) over a small vocabulary (NullTokenizer runs)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt_ids": [rng.randrange(vocab) for _ in range(length)]}) + "\n")


def parse_rule_reward(spec: str):
    """--rule-reward SPEC -> fn(responses: list[list[int]]) -> list[float]. Rules (ids inclusive):
        share:LO-HI   share of response tokens whose id is in [LO, HI] (0 for an empty response)
    e.g. share:7-7 rewards emitting token 7, which invites repetition (the unlikelihood test)."""
    kind, _, arg = spec.partition(":")
    if kind != "share" or "-" not in arg:
        raise ValueError(f"--rule-reward {spec!r}: expected share:LO-HI")
    lo, hi = (int(x) for x in arg.split("-", 1))

    def reward(responses):
        return [sum(lo <= t <= hi for t in r) / len(r) if r else 0.0 for r in responses]

    return reward


def write_repetitive_indexed_dataset(prefix: str, n_docs: int, lo: int, hi: int, length: int, seed: int) -> str:
    """Megatron .bin/.idx of documents that repeat one token id drawn from [lo, hi]: a model pretrained on it
    continues any prompt by repeating its last token, the repetition-prone start of the unlikelihood test."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = random.Random(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        doc = torch.tensor([rng.randint(lo, hi)] * length, dtype=torch.int32)
        builder.add_document(doc, [length])
    builder.finalize(prefix + ".idx")
    return prefix
