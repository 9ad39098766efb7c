"""Fill-in-the-middle (Bavarian et al. 2022) as a training-time transform of GPTDataset samples.

With probability fim_rate a document is cut at two random points into prefix P, middle M, suffix S
and emitted as
    PSM: <|fim_prefix|> P <|fim_suffix|> S <|fim_middle|> M
    SPM: <|fim_prefix|> <|fim_suffix|> S <|fim_middle|> P M      (probability fim_spm_rate)
Cut points are characters (the document is detokenized, cut, and the three parts re-tokenized) or
tokens.  Randomness comes only from (seed, dataset stream, sample index), so a resumed run sees exactly
the samples it would have seen.  A sample keeps its length: longer results are truncated, shorter ones
padded with <|fim_pad|> (which gets no loss).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

MODES = ("plain", "psm", "spm")


@dataclass(frozen=True)
class FIMTokens:
    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> "FIMTokens":
        return cls(tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id)


@dataclass
class FIMResult:
    mode: str  # "plain" | "psm" | "spm"
    tokens: np.ndarray
    prefix: np.ndarray | None = None
    middle: np.ndarray | None = None
    suffix: np.ndarray | None = None
    unit: str = "token"  # the unit actually used ("char" falls back to "token" for partial UTF-8)


def fim_rng(seed: int, sample_index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample: a pure function of (seed, stream, sample index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(sample_index)]))


def _cut(n: int, rng: np.random.Generator) -> tuple[int, int]:
    a, b = rng.integers(0, n + 1, size=2)
    return (int(a), int(b)) if a <= b else (int(b), int(a))


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def apply_fim(doc: Sequence[int], rng: np.random.Generator, *, fim_rate: float, spm_rate: float,
              split_unit: str, ids: FIMTokens, tokenizer: Any = None) -> FIMResult:
    """FIM for one document (token ids without eod).  Always draws the same random numbers for a given
    document, whatever the outcome, so streams stay aligned."""
    doc = _arr(doc)
    u_fim, u_spm = rng.random(), rng.random()
    if doc.size == 0 or u_fim >= fim_rate:
        return FIMResult("plain", doc)
    mode = "spm" if u_spm < spm_rate else "psm"
    unit = split_unit
    if unit == "char":
        if tokenizer is None:
            raise ValueError("fim_split_unit='char' needs the tokenizer")
        try:
            # A document fragment at a sample edge may start/end inside a UTF-8 character; such a
            # fragment has no exact character form, so it is cut at tokens instead.
            text = tokenizer.decode_bytes(doc.tolist()).decode("utf-8")
        except UnicodeDecodeError:
            unit = "token"
    if unit == "char":
        lo, hi = _cut(len(text), rng)
        p, m, s = (_arr(tokenizer.tokenize(t)) for t in (text[:lo], text[lo:hi], text[hi:]))
    elif unit == "token":
        lo, hi = _cut(doc.size, rng)
        p, m, s = doc[:lo], doc[lo:hi], doc[hi:]
    else:
        raise ValueError(f"fim split unit must be 'char' or 'token', got {split_unit!r}")
    if mode == "psm":
        out = np.concatenate([[ids.prefix], p, [ids.suffix], s, [ids.middle], m])
    else:
        out = np.concatenate([[ids.prefix, ids.suffix], s, [ids.middle], p, m])
    return FIMResult(mode, out.astype(np.int64), p, m, s, unit)


def apply_fim_to_sample(sample: np.ndarray, rng: np.random.Generator, *, fim_rate: float, spm_rate: float,
                        split_unit: str, ids: FIMTokens, separators: Sequence[int], tokenizer: Any = None,
                        modes_out: Optional[list] = None) -> np.ndarray:
    """FIM applied independently to every document inside a packed sample; same length out.

    Documents are the maximal runs between separator tokens (eod, the dataset's pad); separators stay in
    place.  Without --append-eod a sample is one run.
    """
    sample = np.asarray(sample)
    n = sample.size
    is_sep = np.isin(sample, np.asarray(list(separators), dtype=sample.dtype))
    pieces, start = [], 0
    while start < n:
        if is_sep[start]:
            pieces.append(sample[start:start + 1].astype(np.int64))
            start += 1
            continue
        end = start
        while end < n and not is_sep[end]:
            end += 1
        res = apply_fim(sample[start:end], rng, fim_rate=fim_rate, spm_rate=spm_rate, split_unit=split_unit,
                        ids=ids, tokenizer=tokenizer)
        if modes_out is not None:
            modes_out.append(res.mode)
        pieces.append(res.tokens)
        start = end
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if out.size > n:
        out = out[:n]
    elif out.size < n:
        out = np.concatenate([out, np.full(n - out.size, ids.pad, dtype=np.int64)])
    return out.astype(sample.dtype, copy=False)


# ----------------------------------------------------------------------------- megatron-core dataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402


@dataclass
class FIMGPTDatasetConfig(GPTDatasetConfig):
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    fim_split_unit: str = "char"  # "char" | "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ValueError(f"--fim-rate must be in [0, 1], got {self.fim_rate}")
        if not 0.0 <= self.fim_spm_rate <= 1.0:
            raise ValueError(f"--fim-spm-rate must be in [0, 1], got {self.fim_spm_rate}")
        if self.fim_split_unit not in ("char", "token"):
            raise ValueError(f"--fim-split-unit must be char or token, got {self.fim_split_unit!r}")
        if self.fim_rate > 0:
            for attr in ("fim_prefix_id", "fim_middle_id", "fim_suffix_id", "fim_pad_id"):
                if not hasattr(self.tokenizer, attr):
                    raise ValueError(f"--fim-rate > 0 needs a tokenizer with FIM special tokens (no {attr} on "
                                     f"{type(self.tokenizer).__name__})")


class FIMGPTDataset(GPTDataset):
    """GPTDataset whose samples get FIM applied to each document; lengths and indices unchanged."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self._fim_on = getattr(cfg, "fim_rate", 0.0) > 0
        if self._fim_on:
            self._fim_ids = FIMTokens.from_tokenizer(cfg.tokenizer)
            # Separate streams for train/valid/test and for different blends of the same seed.
            self._fim_stream = zlib.crc32(self.unique_description_hash.encode())
            self._fim_separators = sorted({int(cfg.tokenizer.eod), int(self._pad_token_id)})

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["fim_rate", "fim_spm_rate", "fim_split_unit"]

    def _query_document_sample_shuffle_indices(self, idx: int):
        text, document_ids = super()._query_document_sample_shuffle_indices(idx)
        if self._fim_on:
            cfg = self.config
            text = apply_fim_to_sample(
                text, fim_rng(cfg.random_seed, idx, self._fim_stream), fim_rate=cfg.fim_rate,
                spm_rate=cfg.fim_spm_rate, split_unit=cfg.fim_split_unit, ids=self._fim_ids,
                separators=self._fim_separators, tokenizer=cfg.tokenizer)
        return text, document_ids

    def __getitem__(self, idx: Optional[int]) -> Dict[str, Any]:
        item = super().__getitem__(idx)
        if self._fim_on:
            item["loss_mask"][item["labels"] == self._fim_ids.pad] = 0.0
        return item
