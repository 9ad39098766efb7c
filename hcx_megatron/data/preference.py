"""Preference data for reward modelling.

JSONL, one prompt per line:
    {"prompt": [{"role": "user", "content": "..."}, ...] | "plain user text",
     "responses": ["r1", "r2", ...]  (strings, or {"role": "assistant", "content": ...}),
     "ranking": [best, ..., worst]}  (indices into responses; all of them, each once)
Pairs are the special case of two responses; `{"prompt", "chosen", "rejected"}` is accepted as shorthand.

Every response is rendered as prompt + assistant turn and tokenized; a ranking of K responses gives the
K(K-1)/2 ordered comparisons (better, worse). All comparisons of one prompt stay together: a prompt is the unit
of batching, so they always share one optimisation step (InstructGPT: splitting them across steps overfits).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch


class PreferenceDataError(ValueError):
    """Bad preference data; the message names the file and line."""


@dataclass
class PreferenceExample:
    sequences: list[list[int]]  # prompt + response ids, one per response
    pairs: list[tuple[int, int]]  # (better, worse) indices into `sequences`
    source: str = ""  # "file:line", for messages


@dataclass
class LoadStats:
    examples: int = 0
    sequences: int = 0
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """Best-first ranking -> all (better, worse) pairs, in order."""
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def _messages(prompt: Any, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise PreferenceDataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def _response_text(r: Any, where: str) -> str:
    if isinstance(r, str):
        return r
    if isinstance(r, dict) and r.get("role", "assistant") == "assistant" and isinstance(r.get("content"), str):
        return r["content"]
    raise PreferenceDataError(f"{where}: each response must be a string or an assistant message")


def parse_record(obj: Any, where: str) -> tuple[list[dict], list[str], list[int]]:
    """Validate one JSON record -> (prompt messages, response texts, best-first ranking)."""
    if not isinstance(obj, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object")
    if "chosen" in obj and "rejected" in obj and "responses" not in obj:
        obj = {"prompt": obj.get("prompt"), "responses": [obj["chosen"], obj["rejected"]], "ranking": [0, 1]}
    for key in ("prompt", "responses", "ranking"):
        if key not in obj:
            raise PreferenceDataError(f"{where}: missing '{key}'")
    responses = obj["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise PreferenceDataError(f"{where}: 'responses' must list at least two responses")
    ranking = obj["ranking"]
    if (not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses)))
            or not all(isinstance(i, int) for i in ranking)):
        raise PreferenceDataError(f"{where}: 'ranking' must order every response index 0..{len(responses) - 1} "
                                  f"exactly once (best first), got {ranking!r}")
    return _messages(obj["prompt"], where), [_response_text(r, where) for r in responses], ranking


def chat_renderer(tokenizer) -> Callable[[list[dict], str | None], list[int]]:
    """(prompt messages, response or None) -> ids in the HCX chat format (hcx_megatron.data.chat, the one
    definition shared with SFT). A response ends with <|endofturn|>; None renders the generation prompt
    (conversation + <|assistant|>) used by PPO."""
    from hcx_megatron.data.chat import prompt_ids, render_ids

    def render(messages: list[dict], response: str | None) -> list[int]:
        if response is None:
            return prompt_ids(tokenizer, messages)
        return render_ids(tokenizer, list(messages) + [{"role": "assistant", "content": response}]).ids

    return render


def build_example(messages: list[dict], responses: list[str], ranking: list[int], render, seq_length: int,
                  stats: LoadStats, where: str = "") -> PreferenceExample:
    try:
        prompt_ids = render(messages, None)
        rendered = [render(messages, r) for r in responses]
    except ValueError as exc:  # hcx_megatron.data.chat.ChatFormatError
        raise PreferenceDataError(f"{where}: {exc}") from None
    seqs = []
    for full in rendered:
        # The rendered conversation starts with the generation prompt's ids: the rest is the response turn.
        if full[: len(prompt_ids)] == prompt_ids:
            prefix, resp = list(prompt_ids), full[len(prompt_ids):]
        else:
            prefix, resp = [], full
        if len(resp) > seq_length:
            resp = resp[: seq_length]
            stats.response_truncated += 1
            prefix = []
        elif len(prefix) + len(resp) > seq_length:
            prefix = prefix[len(prefix) + len(resp) - seq_length:]  # keep the end of the conversation
            stats.prompt_truncated += 1
        seqs.append(prefix + resp)
    stats.examples += 1
    stats.sequences += len(seqs)
    pairs = ranking_pairs(ranking)
    stats.pairs += len(pairs)
    return PreferenceExample(seqs, pairs, where)


def read_preference_jsonl(path: str) -> list[tuple[str, tuple[list[dict], list[str], list[int]]]]:
    """Parse and validate every line (no tokenization). Returns [(\"file:line\", record)]."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreferenceDataError(f"{where}: invalid JSON ({exc.msg})") from None
            out.append((where, parse_record(obj, where)))
    if not out:
        raise PreferenceDataError(f"{path}: no preference records")
    return out


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/valid split of n records (validation = a seeded random subset)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    perm = np.random.RandomState(seed % (2**32)).permutation(n)
    n_valid = int(math.ceil(n * valid_fraction)) if valid_fraction > 0 else 0
    return sorted(perm[n_valid:].tolist()), sorted(perm[:n_valid].tolist())


# ---------------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------------
def collate(examples: Sequence[PreferenceExample], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """All responses of the given prompts in one micro-batch, right-padded to a common length."""
    seqs = [s for ex in examples for s in ex.sequences]
    length = max(len(s) for s in seqs)
    length = ((length + multiple_of - 1) // multiple_of) * multiple_of
    tokens = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    better, worse, offset = [], [], 0
    for ex in examples:
        for b, w in ex.pairs:
            better.append(offset + b)
            worse.append(offset + w)
        offset += len(ex.sequences)
    return {
        "tokens": tokens,
        "position_ids": torch.arange(length, dtype=torch.long).unsqueeze(0).expand(len(seqs), -1).contiguous(),
        "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
        "better": torch.tensor(better, dtype=torch.long),
        "worse": torch.tensor(worse, dtype=torch.long),
    }


@dataclass
class PreferenceBatcher:
    """Global batch = `global_batch` prompts per optimizer step, split over data-parallel ranks, then into
    micro-batches of `micro_batch` prompts. Each epoch visits the prompts in a seeded permutation; the step ->
    prompts map depends only on the iteration (exact resume). The tail that does not fill a step is dropped."""

    examples: list[PreferenceExample]
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    seed: int
    pad_id: int
    multiple_of: int = 1
    _perm: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise ValueError(f"--global-batch-size {self.global_batch} (prompts) must be divisible by "
                             f"--micro-batch-size {self.micro_batch} x data-parallel size {self.dp_size}")
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.examples)} training prompts are fewer than one global batch "
                             f"(--global-batch-size {self.global_batch})")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch

    def step_examples(self, iteration: int) -> list[PreferenceExample]:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch not in self._perm:
            self._perm[epoch] = np.random.RandomState((self.seed + 7919 * epoch) % (2**32)).permutation(
                len(self.examples))
        ids = self._perm[epoch][step * self.global_batch: (step + 1) * self.global_batch]
        per_rank = self.global_batch // self.dp_size
        mine = ids[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]
        return [self.examples[i] for i in mine]

    def microbatches(self, examples: list[PreferenceExample]) -> list[dict[str, torch.Tensor]]:
        return [collate(examples[i: i + self.micro_batch], self.pad_id, self.multiple_of)
                for i in range(0, len(examples), self.micro_batch)]


def eval_shards(examples: list[PreferenceExample], micro_batch: int, dp_rank: int,
                dp_size: int) -> list[PreferenceExample]:
    """This rank's share of a validation/calibration set; every rank gets the same number of micro-batches
    (the remainder of len % (micro_batch * dp_size) prompts is left out)."""
    usable = (len(examples) // (micro_batch * dp_size)) * micro_batch * dp_size
    per_rank = usable // dp_size
    return examples[dp_rank * per_rank: (dp_rank + 1) * per_rank]


__all__ = ["PreferenceExample", "PreferenceDataError", "LoadStats", "ranking_pairs", "parse_record",
           "chat_renderer", "build_example", "read_preference_jsonl", "split_indices", "collate",
           "PreferenceBatcher", "eval_shards"]
