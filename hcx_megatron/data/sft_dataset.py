"""SFT data: chat JSONL -> rendered conversations (with a bad-input report) -> length-grouped, token-budget
micro-batches, optionally packed.

Input: one conversation per line, `{"messages": [{"role": ..., "content": ...}, ...]}` (.jsonl, .gz, .zst).
Each line is rendered with hcx_megatron.data.chat (the one chat format). A line is rejected, counted under a
reason and reported with its file:line when it is not valid UTF-8 / JSON, has no `messages` list, an unknown
role, non-string content, an empty conversation, no assistant token to train on, or is still longer than
`max_length` after the truncation rule. `strict=True` turns any rejection into an error.

Truncation rule ("drop_oldest_turns", default): keep the leading system message(s) and drop the oldest
exchanges (everything up to and including the first remaining assistant message) until the conversation fits,
as long as one assistant message remains. "none": a conversation that does not fit is rejected.

Batching ("length grouped, token budget", the HCX recipe): conversations are sorted by length (random tie
breaks per epoch) and cut greedily into micro-batches whose PADDED size rows x padded_length stays within
`max_tokens`; the order of the micro-batches is then shuffled per epoch. Without a budget each micro-batch
holds a fixed number of rows (still length grouped). With packing, conversations are first packed into rows
of at most `seq_length` input tokens (best-fit decreasing), each keeping its own position ids and a
document id used for a block-causal attention mask, and the rows are then batched the same way.

Micro-batch tensors (all [rows, length]): tokens, labels (next token), loss_mask (assistant targets),
user_mask (user targets: measured, never trained), position_ids (per document), and with packing
`document_ids` (-1 on row padding), from which the SFT forward step builds the block-causal mask of the
micro-batch it runs (`block_causal_mask`, local spec only), plus `cu_seqlens` / `cu_seqlens_padded` (segments of
the flattened rows, for megatron-core PackedSeqParams on Transformer Engine; they differ only under context
parallelism, where each document is padded to a multiple of 2*CP).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from hcx_megatron.data.chat import ChatFormatError, RenderedChat, render_ids, validate_messages
from hcx_megatron.data.jsonl import iter_lines
from hcx_megatron.tokenizer.special_tokens import PAD, SPECIAL_TOKEN_IDS

PAD_ID = SPECIAL_TOKEN_IDS[PAD]
TRUNCATION_RULES = ("drop_oldest_turns", "none")
REJECT_REASONS = ("invalid_utf8", "invalid_json", "bad_messages", "empty_conversation", "unknown_role",
                  "bad_content", "no_assistant_tokens", "too_long")


class SFTDataError(ValueError):
    """Bad SFT input under --strict (or no usable conversation at all)."""


@dataclass
class Conversation:
    ids: np.ndarray  # int32, rendered ids
    loss_mask: np.ndarray  # uint8, 1 = assistant target
    user_mask: np.ndarray  # uint8, 1 = user target (reported, not trained)
    source: str  # "path:line"

    @property
    def input_length(self) -> int:
        """Tokens the model reads: the last id is only a label."""
        return len(self.ids) - 1


@dataclass
class DataReport:
    """What reading the data did, with the file:line of every rejected conversation (first `keep` listed)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 20

    def reject(self, reason: str, where: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        listed = self.examples.setdefault(reason, [])
        if len(listed) < self.keep:
            listed.append(f"{where}: {detail}")

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        head = f"read {self.read} conversations, kept {self.kept} ({self.truncated} truncated), rejected {self.num_rejected}"
        lines = [head]
        for reason in sorted(self.rejected):
            lines.append(f"  {reason}: {self.rejected[reason]}")
            lines += [f"    {e}" for e in self.examples.get(reason, [])]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "rejected": dict(self.rejected),
                "examples": {k: list(v) for k, v in self.examples.items()}}


# ----------------------------------------------------------------------------------------------- reading
def parse_conversation_line(raw: bytes) -> list[dict[str, str]]:
    """One JSONL line -> validated messages, or ChatFormatError with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatFormatError("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError("invalid_json", f"column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        got = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)[:6]}"
        raise ChatFormatError("bad_messages", f"expected an object with a 'messages' list, got {got}")
    messages = validate_messages(obj["messages"])
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ChatFormatError("invalid_utf8", f"message {i} has an unpaired surrogate at char {e.start}") from None
    return messages


def fit_conversation(tokenizer, messages: Sequence[dict], max_length: int,
                     truncation: str = "drop_oldest_turns") -> tuple[RenderedChat, bool]:
    """Render, applying the truncation rule. Returns (rendered, truncated?) or raises ChatFormatError
    (no_assistant_tokens / too_long)."""
    if truncation not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule {truncation!r}; expected one of {TRUNCATION_RULES}")
    msgs = validate_messages(messages)
    # Each message renders independently, so the conversation is the concatenation of its pieces.
    pieces = [render_ids(tokenizer, [m]) for m in msgs]
    n_system = 0
    while n_system < len(msgs) and msgs[n_system]["role"] == "system":
        n_system += 1
    start = n_system  # first kept non-system message
    lengths = [len(p) for p in pieces]

    def total(s: int) -> int:
        return sum(lengths[:n_system]) + sum(lengths[s:])

    truncated = False
    if truncation == "drop_oldest_turns":
        while total(start) > max_length:
            later_assistant = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "assistant"]
            if len(later_assistant) < 2:
                break
            start = later_assistant[0] + 1
            truncated = True
    kept = pieces[:n_system] + pieces[start:]
    rendered = RenderedChat(
        ids=[t for p in kept for t in p.ids],
        loss_mask=[t for p in kept for t in p.loss_mask],
        user_mask=[t for p in kept for t in p.user_mask],
    )
    if rendered.num_loss_tokens == 0:
        raise ChatFormatError("no_assistant_tokens", "no assistant message: nothing to train on")
    if len(rendered) > max_length:
        raise ChatFormatError("too_long", f"{len(rendered)} tokens > max length {max_length}"
                              + (" after dropping older turns" if truncation != "none" else " (truncation none)"))
    return rendered, truncated


def read_conversations(paths: Sequence[str], tokenizer, max_length: int, truncation: str = "drop_oldest_turns",
                       strict: bool = False, flag: str = "--data-path") -> tuple[list[Conversation], DataReport]:
    """Read chat JSONL files. Rejections are counted in the report; `strict` raises SFTDataError on the
    first one, naming file and line."""
    report = DataReport()
    out: list[Conversation] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: {path!r} is not a file (SFT reads chat JSONL files)")
        for lineno, raw in iter_lines(path):
            where = f"{path}:{lineno}"
            report.read += 1
            try:
                messages = parse_conversation_line(raw)
                rendered, truncated = fit_conversation(tokenizer, messages, max_length, truncation)
            except ChatFormatError as e:
                if strict:
                    raise SFTDataError(f"{where}: {e} (--sft-strict)") from None
                report.reject(e.reason, where, e.detail)
                continue
            report.kept += 1
            report.truncated += int(truncated)
            out.append(Conversation(np.asarray(rendered.ids, dtype=np.int32),
                                    np.asarray(rendered.loss_mask, dtype=np.uint8),
                                    np.asarray(rendered.user_mask, dtype=np.uint8), where))
    return out, report


def split_train_valid(n: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split of conversation indices (same on every rank and every run with this seed)."""
    if valid_fraction <= 0:
        return list(range(n)), []
    u = np.random.default_rng([seed, 0x5F7]).random(n)
    valid = [i for i in range(n) if u[i] < valid_fraction]
    train = [i for i in range(n) if u[i] >= valid_fraction]
    return train, valid


def split_fractions(split: str) -> tuple[float, float]:
    """Megatron's --split "train,valid,test" weights -> (valid fraction, test fraction)."""
    try:
        w = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected comma-separated weights like 969,30,1") from None
    w = (w + [0.0, 0.0])[:3]
    if sum(w) <= 0 or any(x < 0 for x in w):
        raise ValueError(f"--split {split!r}: weights must be >= 0 with a positive sum")
    return w[1] / sum(w), w[2] / sum(w)


# ---------------------------------------------------------------------------------------------- batching
def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def budget_batches(lengths: Sequence[int], max_tokens: int | None, rows_per_batch: int, pad_multiple: int,
                   rng: np.random.Generator | None) -> list[list[int]]:
    """Group units (conversations or packed rows) of the given lengths into micro-batches.

    Units are sorted by length (ties broken by `rng`), then cut greedily: a batch grows while
    rows x round_up(longest, pad_multiple) <= max_tokens (or up to `rows_per_batch` rows when max_tokens is
    None). The batch order is shuffled with `rng` (kept sorted when rng is None). Every unit lands in exactly
    one batch; a unit longer than the budget on its own is an error (the caller's length limit prevents it)."""
    n = len(lengths)
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.int64)
    ties = rng.random(n) if rng is not None else np.arange(n)
    order = np.lexsort((ties, lens))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for idx in order:
        length = int(lens[idx])
        if max_tokens is not None and round_up(length, pad_multiple) > max_tokens:
            raise ValueError(f"a sequence of {length} tokens exceeds the micro-batch token budget {max_tokens}")
        grown = max(longest, length)
        fits = (len(current) + 1) * round_up(grown, pad_multiple) <= max_tokens if max_tokens is not None \
            else len(current) < rows_per_batch
        if current and not fits:
            batches.append(current)
            current, grown = [], length
        current.append(int(idx))
        longest = grown
    if current:
        batches.append(current)
    if rng is not None:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def pack_rows(lengths: Sequence[int], capacity: int, rng: np.random.Generator | None) -> list[list[int]]:
    """Best-fit decreasing bin packing of documents into rows of at most `capacity` tokens."""
    n = len(lengths)
    lens = np.asarray(lengths, dtype=np.int64)
    if n and lens.max() > capacity:
        raise ValueError(f"a document of {int(lens.max())} tokens does not fit a packed row of {capacity}")
    ties = rng.random(n) if rng is not None else np.arange(n)
    order = np.lexsort((ties, -lens))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for idx in order:
        length = int(lens[idx])
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            remaining, row = free.pop(k)
        else:
            rows.append([])
            remaining, row = capacity, len(rows) - 1
        rows[row].append(int(idx))
        bisect.insort(free, (remaining - length, row))
    return rows


@dataclass
class BatchingConfig:
    seq_length: int  # max input tokens of a (packed) row
    max_tokens: int | None  # padded tokens per micro-batch; None = fixed rows_per_batch
    rows_per_batch: int = 1
    pad_multiple: int = 8
    packing: bool = False
    seed: int = 1234
    # Packed documents take a multiple of this many tokens of their row: context parallelism cuts every document
    # of a THD batch into 2*CP chunks (hcx_megatron.config.sequence.context_parallel_chunks); 1 otherwise.
    document_multiple: int = 1


class MicroBatchPlan:
    """The micro-batches of each epoch as lists of units (a unit = list of conversation indices: one
    conversation, or a packed row). Pure function of (lengths, config, epoch), so a resumed run sees the same
    batches."""

    def __init__(self, input_lengths: Sequence[int], config: BatchingConfig, shuffle: bool = True):
        self.lengths = [int(x) for x in input_lengths]
        self.config = config
        self.shuffle = shuffle
        self.num_batches = len(self.epoch(0))

    @lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> list[list[list[int]]]:
        c = self.config
        rng = np.random.default_rng([c.seed, epoch, 0xB47C]) if self.shuffle else None
        if c.packing:
            units = pack_rows([round_up(n, c.document_multiple) for n in self.lengths], c.seq_length, rng)
        else:
            units = [[i] for i in range(len(self.lengths))]
        doc_multiple = c.document_multiple if c.packing else 1
        unit_lengths = [sum(round_up(self.lengths[i], doc_multiple) for i in u) for u in units]
        batches = budget_batches(unit_lengths, c.max_tokens, c.rows_per_batch, c.pad_multiple, rng)
        return [[units[u] for u in b] for b in batches]

    def batch(self, global_index: int) -> list[list[int]]:
        """Micro-batch number `global_index` counted over consecutive epochs."""
        if self.num_batches == 0:
            raise SFTDataError("no micro-batches: the dataset is empty")
        epoch, pos = divmod(global_index, self.num_batches)
        return self.epoch(epoch)[pos]


def _padded(values: np.ndarray, width: int, fill: int) -> np.ndarray:
    return np.concatenate([values, np.full(width - len(values), fill, dtype=values.dtype)])


def collate(conversations: Sequence[Conversation], batch: Sequence[Sequence[int]], pad_multiple: int,
            packed: bool, pad_id: int = PAD_ID, document_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Tensors of one micro-batch (see the module docstring). `batch` = rows of conversation indices.
    With `packed`, each document takes a multiple of `document_multiple` tokens of its row (2*CP under context
    parallelism, see BatchingConfig); the row length must then stay a multiple of it too."""
    if packed and pad_multiple % document_multiple:
        raise ValueError(f"pad multiple {pad_multiple} is not a multiple of the packed document multiple "
                         f"{document_multiple}")
    doc_multiple = document_multiple if packed else 1
    rows = []
    for unit in batch:
        parts = [conversations[i] for i in unit]
        widths = [round_up(c.input_length, doc_multiple) for c in parts]
        rows.append({
            "tokens": np.concatenate([_padded(c.ids[:-1], w, pad_id) for c, w in zip(parts, widths)]),
            "labels": np.concatenate([_padded(c.ids[1:], w, pad_id) for c, w in zip(parts, widths)]),
            "loss_mask": np.concatenate([_padded(c.loss_mask[1:], w, 0) for c, w in zip(parts, widths)]),
            "user_mask": np.concatenate([_padded(c.user_mask[1:], w, 0) for c, w in zip(parts, widths)]),
            "position_ids": np.concatenate([np.arange(w) for w in widths]),
            # A document's padding belongs to the document: it comes after its tokens, so causal attention
            # keeps it out of their view, and it never forms an all-masked row.
            "doc": np.concatenate([np.full(w, k) for k, w in enumerate(widths)]),
            "real_lengths": [c.input_length for c in parts],
            "widths": widths,
        })
    length = round_up(max(len(r["tokens"]) for r in rows), pad_multiple)
    b = len(rows)
    out = {
        "tokens": torch.full((b, length), pad_id, dtype=torch.long),
        "labels": torch.full((b, length), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((b, length), dtype=torch.float32),
        "user_mask": torch.zeros((b, length), dtype=torch.float32),
        "position_ids": torch.arange(length, dtype=torch.long).repeat(b, 1),
    }
    doc = torch.full((b, length), -1, dtype=torch.long)  # padding: its own segment, so no row is all-masked
    # Segments of the flattened rows: each document, then the row's tail padding as a segment of its own.
    # cu_seqlens counts a document's tokens, cu_seqlens_padded the room it takes (TE's THD convention).
    cu, cu_padded = [0], [0]
    for r, row in enumerate(rows):
        n = len(row["tokens"])
        for key in ("tokens", "labels", "position_ids"):
            out[key][r, :n] = torch.from_numpy(row[key].astype(np.int64))
        out["loss_mask"][r, :n] = torch.from_numpy(row["loss_mask"].astype(np.float32))
        out["user_mask"][r, :n] = torch.from_numpy(row["user_mask"].astype(np.float32))
        out["position_ids"][r, n:] = torch.arange(length - n)
        doc[r, :n] = torch.from_numpy(row["doc"].astype(np.int64))
        segments = list(zip(row["real_lengths"], row["widths"])) + ([(length - n, length - n)] if n < length else [])
        for real, width in segments:
            cu.append(cu[-1] + real)
            cu_padded.append(cu_padded[-1] + width)
    if packed:
        # Per-token document ids, not a [b, 1, s, s] mask: the forward step builds the mask of the micro-batch it
        # runs, and only on the local spec (Transformer Engine takes cu_seqlens).
        out["document_ids"] = doc
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        out["cu_seqlens_padded"] = torch.tensor(cu_padded, dtype=torch.int32)
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] bool on their device, True where attention is NOT allowed (other
    document or future position)."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


def real_tokens(conversations: Sequence[Conversation], batch: Iterable[Sequence[int]]) -> int:
    return sum(conversations[i].input_length for unit in batch for i in unit)


__all__ = [
    "Conversation", "DataReport", "SFTDataError", "BatchingConfig", "MicroBatchPlan", "TRUNCATION_RULES",
    "REJECT_REASONS", "parse_conversation_line", "fit_conversation", "read_conversations", "split_train_valid",
    "split_fractions", "budget_batches", "pack_rows", "collate", "block_causal_mask", "real_tokens", "round_up",
]
