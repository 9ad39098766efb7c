"""Add morpheme-aware Korean tokens to an existing byte-level BPE tokenizer (an open model's tokenizer.json).

What is added. Kiwi (morpheme.py) cuts the Korean words of a corpus at morpheme boundaries; the pieces that are
pure Hangul syllables (U+AC00-U+D7A3), with the leading space the encode-time pre-tokenizer attaches to a word,
are the candidates (" 학교", "에서"). They are ranked by frequency x (old token count - 1), i.e. the tokens they
save, and taken greedily until `num_new_tokens` vocabulary entries have been added. Each candidate is reached by
BPE merges appended AFTER all existing merges: first its syllables (a syllable's old pieces joined left to right,
e.g. (í,ķ) then (íķ,Ļ) for the three bytes of 학), then the morpheme from its current pieces, left to right.
Intermediate results ("íķ") are new tokens too and count towards the budget. New ids follow the largest id in
use, so every old id keeps its meaning.

What is guaranteed, and why (checked by `check_merge_is_protected` for every merge, tested on corpora):
text without a character in U+AC00-U+D7FF (Hangul syllables and Jamo Extended-B) encodes to exactly the same
ids. BPE applies, within one pre-tokenized word, the applicable merge of lowest rank first; new merges rank
after every old one, so they can only fire once the old merges are exhausted, i.e. on the OLD encoding of the
word. Every new merge (a, b) has, inside the bytes of a+b, the lead byte and first continuation byte of a
character in U+AC00-U+D7FF, and in valid UTF-8 those two bytes occur nowhere else; so two adjacent old tokens of
a word without such a character never form a new merge, and the word's encoding ends where it ended before. New
vocabulary entries all contain such bytes, so `ignore_merges` (whole-word lookup) cannot match them either.
Words of Korean text are re-encoded (that is the point); the other words of the same text are not.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from hcx_megatron.tokenizer.hcx_tokenizer import byte_to_unicode
from hcx_megatron.tokenizer.hf_tokenizer import HF_TOKENIZER_FILE
from hcx_megatron.tokenizer.special_tokens import ENDOFTEXT, SPECIAL_TOKENS

EXTEND_METADATA_FILE = "hcx_extend_vocab.json"
PROTECTED_FIRST, PROTECTED_LAST = 0xAC00, 0xD7FF  # Hangul syllables + Jamo Extended-B (UTF-8 lead EA..ED)
KOREAN_PIECE = re.compile(r" ?[\uac00-\ud7a3]+")

_BYTE_TO_CHAR = byte_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def to_byte_level(text: str) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


def from_byte_level(token: str) -> bytes:
    return bytes(_CHAR_TO_BYTE[c] for c in token)


def check_merge_is_protected(a: str, b: str) -> bool:
    """True when the bytes of a+b contain a lead byte and its first continuation byte that together only start
    characters in U+AC00-U+D7FF (the invariant the module docstring's proof needs)."""
    raw = from_byte_level(a + b)
    for i in range(len(raw) - 1):
        lead, cont = raw[i], raw[i + 1]
        if 0xE0 <= lead <= 0xEF and 0x80 <= cont <= 0xBF:
            lowest = ((lead & 0x0F) << 12) | ((cont & 0x3F) << 6)  # the 64 code points this byte pair can start
            if PROTECTED_FIRST <= lowest and lowest + 63 <= PROTECTED_LAST:
                return True
    return False


class BPEMerges:
    """Merge ranks with an optional overlay of tentative merges, and the classic BPE loop for one word."""

    def __init__(self, merges: Sequence[tuple[str, str]]):
        self.rank = {tuple(m): i for i, m in enumerate(merges)}

    def encode_word(self, word: str, extra: dict[tuple[str, str], int] | None = None) -> list[str]:
        symbols = list(word)
        extra = extra or {}
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                pair = (symbols[i], symbols[i + 1])
                r = self.rank.get(pair, extra.get(pair))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        return symbols


@dataclass
class ExtensionResult:
    source: str
    output: str
    old_vocab_size: int
    new_vocab_size: int
    new_tokens: int
    new_merges: int
    morpheme_tokens: int  # candidates made whole tokens (the rest of new_tokens are syllables/intermediates)
    added_special_tokens: list[str] = field(default_factory=list)
    candidates: int = 0
    corpus_documents: int = 0
    skipped_unprotected: int = 0
    unreachable: list[str] = field(default_factory=list)


def read_tokenizer_json(tokenizer_dir: str) -> dict:
    path = os.path.join(tokenizer_dir, HF_TOKENIZER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_dir}: no {HF_TOKENIZER_FILE}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; extend_vocab handles byte-level BPE only")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: decoder {(data.get('decoder') or {}).get('type')!r} is not ByteLevel; "
                         "extend_vocab handles byte-level BPE only")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"{path}: model.{key}={model[key]!r} is not supported by extend_vocab")
    if data.get("normalizer") is not None:
        raise ValueError(f"{path}: has a normalizer ({data['normalizer'].get('type')}); extend_vocab needs the "
                         "pre-tokenizer to see the raw text")
    return data


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" strings (older files) or as [a, b] pairs (0.20+).
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def korean_piece_counts(texts: Iterable[str], tokenizer, segmenter, batch_size: int = 64) -> tuple[Counter, int]:
    """Byte-level strings of the Korean morpheme pieces of `texts` (cut at Kiwi boundaries inside each
    pre-tokenized word) -> occurrences; and the number of documents read."""
    counts: Counter = Counter()
    docs = 0
    batch: list[str] = []

    def flush():
        for text, bounds in zip(batch, segmenter.boundaries_many(batch)):
            bounds = sorted(bounds)
            for _, (start, end) in tokenizer.pre_tokenizer.pre_tokenize_str(text):
                word = text[start:end]
                if not KOREAN_PIECE.search(word):
                    continue
                cuts = [b - start for b in bounds[bisect.bisect_right(bounds, start):bisect.bisect_left(bounds, end)]]
                prev = 0
                for cut in cuts + [len(word)]:
                    piece = word[prev:cut]
                    prev = cut
                    if KOREAN_PIECE.fullmatch(piece):
                        counts[to_byte_level(piece)] += 1
        batch.clear()

    for text in texts:
        docs += 1
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return counts, docs


def plan_new_merges(pieces: Counter, merges: Sequence[tuple[str, str]], vocab: dict[str, int],
                    num_new_tokens: int) -> tuple[list[tuple[str, str]], list[str], int, int]:
    """Greedy choice of (new merges in rank order, new tokens in id order, whole candidates added, candidates
    skipped because a merge would break the invariant)."""
    bpe = BPEMerges(merges)
    known = set(vocab)
    base_rank = len(merges)
    new_merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    extra: dict[tuple[str, str], int] = {}

    def score(item):
        piece, n = item
        return n * (len(bpe.encode_word(piece)) - 1)

    ranked = sorted(((p, n) for p, n in pieces.items() if p not in known), key=lambda it: (-score(it), it[0]))
    whole, skipped = 0, 0
    for piece, n in ranked:
        if len(new_tokens) >= num_new_tokens or score((piece, n)) <= 0:
            break
        plan_merges: list[tuple[str, str]] = []
        plan_tokens: list[str] = []
        trial = dict(extra)

        def chain(parts: list[str]) -> None:
            acc = parts[0]
            for part in parts[1:]:
                if (acc, part) not in bpe.rank and (acc, part) not in trial:
                    trial[(acc, part)] = base_rank + len(new_merges) + len(plan_merges)
                    plan_merges.append((acc, part))
                acc = acc + part
                if acc not in known and acc not in plan_tokens:
                    plan_tokens.append(acc)

        body = piece[1:] if piece.startswith(_BYTE_TO_CHAR[0x20]) else piece
        for k in range(0, len(body), 3):  # every syllable is 3 UTF-8 bytes = 3 byte-level characters
            chain(bpe.encode_word(body[k:k + 3], trial))
        chain(bpe.encode_word(piece, trial))
        if len(new_tokens) + len(plan_tokens) > num_new_tokens:
            continue
        if not all(check_merge_is_protected(a, b) for a, b in plan_merges):
            skipped += 1
            continue
        new_merges.extend(plan_merges)
        new_tokens.extend(plan_tokens)
        known.update(plan_tokens)
        extra = trial
        whole += 1
    return new_merges, new_tokens, whole, skipped


def extend_tokenizer(tokenizer_dir: str, corpus_texts: Iterable[str], output_dir: str, num_new_tokens: int,
                     add_hcx_special_tokens: bool = False, segmenter=None) -> ExtensionResult:
    """Write `output_dir` (a copy of `tokenizer_dir` with the extended tokenizer.json), atomically."""
    from tokenizers import Tokenizer

    if os.path.exists(output_dir):
        raise FileExistsError(f"--output-tokenizer {output_dir} exists; choose a new directory")
    if num_new_tokens < 0:
        raise ValueError(f"--num-new-tokens must be >= 0, got {num_new_tokens}")
    data = read_tokenizer_json(tokenizer_dir)
    old = Tokenizer.from_file(os.path.join(tokenizer_dir, HF_TOKENIZER_FILE))
    model = data["model"]
    merges = _merge_pairs(model)
    all_ids = old.get_vocab(with_added_tokens=True)
    old_vocab_size = max(all_ids.values()) + 1
    if segmenter is None:
        from hcx_megatron.tokenizer.morpheme import MorphemeSegmenter

        segmenter = MorphemeSegmenter()
    pieces, docs = korean_piece_counts(corpus_texts, old, segmenter)
    new_merges, new_tokens, whole, skipped = plan_new_merges(pieces, merges, model["vocab"], num_new_tokens)

    next_id = old_vocab_size
    for tok in new_tokens:
        model["vocab"][tok] = next_id
        next_id += 1
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"].extend(f"{a} {b}" if string_merges else [a, b] for a, b in new_merges)
    added_special: list[str] = []
    if add_hcx_special_tokens:
        # <|endoftext|>'s role (eod) is the tokenizer's own eos; the others are control tokens HCX runs need.
        for literal in SPECIAL_TOKENS:
            if literal == ENDOFTEXT or literal in all_ids:
                continue
            data.setdefault("added_tokens", []).append(
                {"id": next_id, "content": literal, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True})
            added_special.append(literal)
            next_id += 1

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + ".tmp", dir=parent)
    try:
        for name in os.listdir(tokenizer_dir):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and name != HF_TOKENIZER_FILE:
                shutil.copy2(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, HF_TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        if added_special:
            _register_added_tokens(tmp, added_special, old_vocab_size + len(new_tokens))
        extended = Tokenizer.from_file(os.path.join(tmp, HF_TOKENIZER_FILE))
        # Every new token must be what its own text encodes to, or the chain was wrong.
        unreachable = [t for t in new_tokens
                       if extended.encode(from_byte_level(t).decode("utf-8", "replace"), add_special_tokens=False).ids
                       != [model["vocab"][t]] and _is_whole_utf8(t)]
        result = ExtensionResult(
            source=os.path.abspath(tokenizer_dir), output=os.path.abspath(output_dir), old_vocab_size=old_vocab_size,
            new_vocab_size=next_id, new_tokens=len(new_tokens), new_merges=len(new_merges), morpheme_tokens=whole,
            added_special_tokens=added_special, candidates=len(pieces), corpus_documents=docs,
            skipped_unprotected=skipped, unreachable=unreachable)
        with open(os.path.join(tmp, EXTEND_METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump({**asdict(result), "rule": "new merges appended after all old merges; every new merge holds "
                       "the first two UTF-8 bytes of a character in U+AC00-U+D7FF, so text without such characters "
                       "encodes identically", "first_new_id": old_vocab_size}, f, ensure_ascii=False, indent=2)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _is_whole_utf8(token: str) -> bool:
    try:
        from_byte_level(token).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False  # an intermediate such as the first two bytes of a syllable: no text encodes to it alone


def _register_added_tokens(tmp_dir: str, literals: list[str], first_id: int) -> None:
    """transformers rebuilds added tokens from tokenizer_config.json's added_tokens_decoder when it has one."""
    path = os.path.join(tmp_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None:
        return
    for k, literal in enumerate(literals):
        decoder[str(first_id + k)] = {"content": literal, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)


__all__ = ["extend_tokenizer", "ExtensionResult", "check_merge_is_protected", "BPEMerges", "korean_piece_counts",
           "plan_new_merges", "EXTEND_METADATA_FILE"]
