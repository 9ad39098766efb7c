"""Tokenizer quality metrics (tools/tokenizer_report.py): compression and morpheme alignment.

Morpheme alignment: over every token boundary that falls strictly inside a whitespace-delimited word
containing Hangul, the share that coincides with an analyser morpheme boundary (Kiwi, same rule as
training: offsets where the original string really divides).  Boundaries are compared in UTF-8 byte
offsets, so a byte-level token that ends inside a syllable counts as misaligned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from hcx_megatron.tokenizer.morpheme import MorphemeSegmenter, has_hangul

_WORD = re.compile(r"\S+")


@dataclass
class LangStats:
    docs: int = 0
    tokens: int = 0
    chars: int = 0
    bytes: int = 0
    inner_boundaries: int = 0  # token boundaries inside Korean words
    aligned_boundaries: int = 0  # ... of which on a morpheme boundary
    unk: int = 0

    @property
    def tokens_per_doc(self) -> float:
        return self.tokens / max(self.docs, 1)

    @property
    def tokens_per_kchar(self) -> float:
        return 1000.0 * self.tokens / max(self.chars, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def morpheme_alignment(self) -> float | None:
        return self.aligned_boundaries / self.inner_boundaries if self.inner_boundaries else None


def _char_to_byte(text: str) -> list[int]:
    out, b = [], 0
    for ch in text:
        out.append(b)
        b += len(ch.encode("utf-8"))
    out.append(b)
    return out


def hangul_word_byte_spans(text: str, c2b: Sequence[int]) -> list[tuple[int, int]]:
    return [(c2b[m.start()], c2b[m.end()]) for m in _WORD.finditer(text) if has_hangul(m.group())]


def token_byte_boundaries(tokenizer, ids: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for i in ids:
        pos += len(tokenizer.token_bytes(i))
        out.append(pos)
    return out[:-1]


def alignment_counts(token_bounds: Sequence[int], word_spans: Sequence[tuple[int, int]],
                     morph_bounds: set[int]) -> tuple[int, int]:
    """(token boundaries strictly inside Korean words, of those on a morpheme boundary); byte offsets."""
    inner = aligned = 0
    j = 0
    spans = sorted(word_spans)
    for b in token_bounds:  # both sorted: one sweep
        while j < len(spans) and spans[j][1] <= b:
            j += 1
        if j < len(spans) and spans[j][0] < b < spans[j][1]:
            inner += 1
            aligned += b in morph_bounds
    return inner, aligned


def evaluate(tokenizer, texts: Sequence[str], segmenter: MorphemeSegmenter | None,
             morph_cache: list[list[int]] | None = None, unk_id: int | None = None) -> LangStats:
    st = LangStats()
    morph = morph_cache if morph_cache is not None else (
        segmenter.boundaries_many(texts) if segmenter is not None else [[] for _ in texts])
    for text, mb, ids in zip(texts, morph, tokenizer.tokenize_batch(texts)):
        st.docs += 1
        st.tokens += len(ids)
        st.chars += len(text)
        c2b = _char_to_byte(text)
        st.bytes += c2b[-1]
        if unk_id is not None:
            st.unk += sum(1 for i in ids if i == unk_id)
        spans = hangul_word_byte_spans(text, c2b)
        if spans:
            inner, aligned = alignment_counts(token_byte_boundaries(tokenizer, ids), spans, {c2b[b] for b in mb})
            st.inner_boundaries += inner
            st.aligned_boundaries += aligned
    return st


@dataclass
class ReportRow:
    name: str
    lang: str
    stats: LangStats
    vocab_size: int
    train_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def markdown_table(rows: Sequence[ReportRow]) -> str:
    head = ("| tokenizer | lang | vocab | docs | tokens/doc | tokens/1k chars | bytes/token | "
            "morpheme-aligned boundaries in Korean words |\n|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        s = r.stats
        al = "n/a" if s.morpheme_alignment is None else f"{100 * s.morpheme_alignment:.1f}% of {s.inner_boundaries:,}"
        lines.append(f"| {r.name} | {r.lang} | {r.vocab_size:,} | {s.docs:,} | {s.tokens_per_doc:,.1f} | "
                     f"{s.tokens_per_kchar:.1f} | {s.bytes_per_token:.2f} | {al} |")
    return "\n".join(lines)
