"""Korean morpheme boundaries for tokenizer TRAINING (never used at encode time).

Kiwi (kiwipiepy) gives morphemes with character offsets into the original string. We only ever split
the original text at those offsets (the analyzer's normalised forms such as 하+었 for 했 are ignored),
and only at offsets where the string really divides: contracted morphemes share or overlap spans
(했 = 하[14,15) + 었[14,15); 그랬었 = 그렇[19,21) + 었었[20,22)), so an offset lying strictly inside any
morpheme span is not a boundary.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

# Private-use-free noncharacter: the training pre-tokenizer splits on it and drops it.  Text that
# already contains it only loses that code point from the *training* statistics, never from encoding.
MORPHEME_DELIMITER = "\ufdd0"


def is_hangul(ch: str) -> bool:
    o = ord(ch)
    return (0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F
            or 0xA960 <= o <= 0xA97F or 0xD7B0 <= o <= 0xD7FF)


def has_hangul(text: str) -> bool:
    return any(is_hangul(c) for c in text)


def valid_split_offsets(spans: Iterable[tuple[int, int]]) -> list[int]:
    """Offsets (sorted, unique) that start or end a morpheme and fall strictly inside no morpheme span."""
    spans = [(s, e) for s, e in spans if e > s]
    candidates = sorted({s for s, _ in spans} | {e for _, e in spans})
    if not spans:
        return []
    # Sweep: an offset b is covered when some span has s < b < e.
    by_start = sorted(spans)
    out, i, max_end = [], 0, -1
    for b in candidates:
        while i < len(by_start) and by_start[i][0] < b:
            max_end = max(max_end, by_start[i][1])
            i += 1
        if max_end <= b:
            out.append(b)
    return out


def word_internal_boundaries(text: str, offsets: Iterable[int]) -> list[int]:
    """Keep offsets strictly inside a whitespace-delimited word that contains Hangul.

    Boundaries next to whitespace are dropped on purpose: the encode-time pre-tokenizer attaches a
    leading space to the following word (" 학교"), and splitting there at training time would teach
    merges that never apply at encode time.
    """
    n = len(text)
    out = []
    for b in offsets:
        if 0 < b < n and not text[b - 1].isspace() and not text[b].isspace():
            lo = b
            while lo > 0 and not text[lo - 1].isspace():
                lo -= 1
            hi = b
            while hi < n and not text[hi].isspace():
                hi += 1
            if has_hangul(text[lo:hi]):
                out.append(b)
    return out


def insert_delimiter(text: str, boundaries: Sequence[int], delim: str = MORPHEME_DELIMITER) -> str:
    if not boundaries:
        return text
    parts, prev = [], 0
    for b in boundaries:
        parts.append(text[prev:b])
        prev = b
    parts.append(text[prev:])
    return delim.join(parts)


def split_at(text: str, boundaries: Sequence[int]) -> list[str]:
    return insert_delimiter(text, boundaries, "\0").split("\0") if boundaries else [text]


class MorphemeSegmenter:
    """Finds Korean morpheme boundaries inside words with Kiwi. Only lines containing Hangul are analysed
    (the analyser is ~0.2-0.4 MB/s per core, so skipping English/code lines matters)."""

    def __init__(self, num_workers: int = 1):
        from kiwipiepy import Kiwi  # imported lazily: loading its model takes ~1 s

        self._kiwi = Kiwi(num_workers=num_workers)

    def _line_offsets(self, line: str, tokens) -> list[int]:
        spans = [(t.start, t.start + t.len) for t in tokens if 0 <= t.start and t.start + t.len <= len(line)]
        return word_internal_boundaries(line, valid_split_offsets(spans))

    def boundaries_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Morpheme boundaries (char offsets) inside Korean words, for each text."""
        jobs: list[tuple[int, int, str]] = []  # (text index, line start offset, line)
        for ti, text in enumerate(texts):
            pos = 0
            for line in text.splitlines(keepends=True):
                if has_hangul(line):
                    jobs.append((ti, pos, line))
                pos += len(line)
        result: list[list[int]] = [[] for _ in texts]
        if not jobs:
            return result
        analysed = self._kiwi.tokenize([line for _, _, line in jobs])
        for (ti, base, line), tokens in zip(jobs, analysed):
            result[ti].extend(base + b for b in self._line_offsets(line, tokens))
        return result

    def boundaries(self, text: str) -> list[int]:
        return self.boundaries_many([text])[0]

    def segment(self, text: str) -> list[str]:
        """The text cut into boundary-preserving pieces; "".join(pieces) == text always."""
        return split_at(text, self.boundaries(text))

    def mark_many(self, texts: Sequence[str], delim: str = MORPHEME_DELIMITER) -> Iterator[str]:
        for text, bs in zip(texts, self.boundaries_many(texts)):
            yield insert_delimiter(text, bs, delim)
