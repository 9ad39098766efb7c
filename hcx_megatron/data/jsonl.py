"""Streaming JSONL reading (plain, .gz, .zst) with per-line validation and reasons for rejects.

Kept free of tokenizer/megatron imports so worker processes and tests can use it cheaply.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

# Reasons a line is rejected; the preprocessing summary counts them under these names.
REASONS = ("invalid_json", "missing_key", "non_string", "invalid_utf8", "empty_text")


class BadLine(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def open_binary(path: str) -> BinaryIO:
    """Open a (possibly compressed) file for streaming binary reads, chosen by suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline). Blank lines are skipped silently."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield lineno, raw


def parse_line(raw: bytes, keys: Sequence[str]) -> list[str]:
    """The strings under `keys` of one JSONL line, or BadLine with the reason."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("invalid_json", f"column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise BadLine("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    out = []
    for key in keys:
        if key not in obj:
            raise BadLine("missing_key", f"no key {key!r} (keys: {sorted(obj)[:8]})")
        value = obj[key]
        if not isinstance(value, str):
            raise BadLine("non_string", f"{key!r} is {type(value).__name__}, not a string")
        try:
            # JSON "\ud800" escapes decode to lone surrogates, which have no UTF-8 form.
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadLine("invalid_utf8", f"{key!r} has an unpaired surrogate at char {e.start}") from None
        if not value.strip():
            raise BadLine("empty_text", f"{key!r} is empty or whitespace only")
        out.append(value)
    return out


@dataclass
class Doc:
    path: str
    lineno: int
    texts: list[str]


def iter_texts(paths: Sequence[str], keys: Sequence[str] = ("text",), max_docs: int | None = None,
               strict: bool = False) -> Iterator[Doc]:
    """Valid documents of several JSONL files in order; bad lines are skipped (or raised when strict)."""
    n = 0
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file not found: {path}")
        for lineno, raw in iter_lines(path):
            try:
                texts = parse_line(raw, keys)
            except BadLine as e:
                if strict:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                continue
            yield Doc(path, lineno, texts)
            n += 1
            if max_docs is not None and n >= max_docs:
                return
