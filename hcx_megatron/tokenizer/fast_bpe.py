"""A faster encoder for HCX byte-level BPE tokenizers that gives exactly Hugging Face `tokenizers`' ids.

Why it is exact.  For a `tokenizer.json` of the form HCX trains (no normalizer; pre-tokenizer
`Sequence[Split(Regex(P), "isolated"), ByteLevel(add_prefix_space=False, use_regex=False)]`; a BPE model
without dropout; every added token special and `encode_special_tokens=True`, so added tokens are never
matched in text), `Tokenizer.encode(text, add_special_tokens=False).ids` is

    concat(model.tokenize(byte_level(piece)) for piece in split(P, text))

because the BPE model runs on each pre-token on its own.  This encoder computes the same expression:

  * `split` runs the same pattern P with the `regex` module instead of Oniguruma.  Both are backtracking
    engines with ordered alternation over the same syntax; what can differ is the meaning of P's Unicode
    classes (`\\s`, `\\S`, `\\p{L}`, `\\p{M}`, `\\p{N}`; `regex` ships a newer Unicode than the Oniguruma
    inside `tokenizers`: 4,699 code points differ with tokenizers 0.23 / regex 2026.5).  The code points
    where they differ are computed exhaustively — every scalar value U+0000..U+10FFFF is put through
    Oniguruma (via `tokenizers`) and through `regex` (`class_disagreements`, cached per pair of versions) —
    and a document containing any of them is encoded by `tokenizers` itself.  On every other document
    each character is in the same classes for both engines, so both produce the same matches.  A pattern
    using any other class or escape is not accepted and the encoder falls back to `tokenizers`.
  * `model.tokenize` is `tokenizers`' own BPE model, called once per distinct pre-token; the result is
    memoised in a dict (a pure function of the pre-token, so the memo cannot change ids).
  * "isolated" splitting also emits the text between matches as pieces; P matches every character, so
    there is none — checked per document (pieces must cover the text), else that document goes through
    `tokenizers` unchanged.

Where the win comes from: Oniguruma's Unicode-class matching and the per-token `Encoding` objects
(strings, offsets, masks) are most of `tokenizers`' encode time; here a document is one `findall` plus one
dict lookup per pre-token.  Imports neither torch nor megatron-core.
"""

from __future__ import annotations

import json
import os
import tempfile
from itertools import chain
from typing import Sequence

from hcx_megatron.tokenizer.special_tokens import ENDOFTEXT, SPECIAL_TOKENS, special_token_id

# Classes the translation understands; each is probed in Oniguruma.
CLASSES = (r"\s", r"\S", r"\p{L}", r"\p{M}", r"\p{N}")
_CACHE_VERSION = 1


def _byte_table() -> str:
    """str.translate table: latin-1 char of a byte -> its byte-level BPE alphabet char."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTE_LEVEL = _byte_table()


def byte_level(piece: str) -> str:
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_LEVEL)


# --------------------------------------------------------------------------- Oniguruma class tables
def _all_code_points() -> str:
    return "".join(map(chr, chain(range(0xD800), range(0xE000, 0x110000))))


def _ranges(code_points: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for c in sorted(code_points):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def probe_onig_classes() -> dict[str, list[list[int]]]:
    """For each class in CLASSES, the code points Oniguruma (inside `tokenizers`) matches, as ranges.
    Exhaustive: every scalar value is tested (`Replace(Regex(cls), "")` deletes the members)."""
    from tokenizers import Regex, normalizers

    every = _all_code_points()
    universe = set(map(ord, every))
    out = {}
    for cls in CLASSES:
        rest = normalizers.Replace(Regex(cls), "").normalize_str(every)
        out[cls] = _ranges(universe - set(map(ord, rest)))
    return out


def probe_regex_classes() -> dict[str, list[list[int]]]:
    """The same table for the `regex` module (what the fast path's findall uses)."""
    import regex

    every = _all_code_points()
    return {cls: _ranges(map(ord, regex.findall(cls, every))) for cls in CLASSES}


def _members(ranges: list[list[int]]) -> set[int]:
    return {c for a, b in ranges for c in range(a, b + 1)}


def _cache_path() -> str:
    import regex
    import tokenizers

    root = os.environ.get("HCX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hcx_megatron")
    return os.path.join(root, f"class-disagreements-v{_CACHE_VERSION}-tokenizers-{tokenizers.__version__}"
                              f"-regex-{regex.__version__}.json")


def class_disagreements(cache: bool = True) -> list[list[int]]:
    """Code points (as ranges) whose membership in any of CLASSES differs between Oniguruma (`tokenizers`)
    and the `regex` module.  Exhaustive over all scalar values; ~2 CPU-seconds, so cached on disk per pair
    of installed versions ($HCX_CACHE_DIR, default ~/.cache/hcx_megatron)."""
    path = _cache_path()
    if cache and os.path.exists(path):
        try:
            with open(path) as f:
                return json.load(f)["disagreements"]
        except (OSError, ValueError, KeyError):
            pass
    onig, rx = probe_onig_classes(), probe_regex_classes()
    diff: set[int] = set()
    for cls in CLASSES:
        diff |= _members(onig[cls]) ^ _members(rx[cls])
    out = _ranges(diff)
    if cache:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"disagreements": out}, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return out


def _class_body(ranges: list[list[int]]) -> str:
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)


class UnsupportedPattern(ValueError):
    pass


def check_pattern(pattern: str) -> None:
    r"""Raise UnsupportedPattern unless every backslash construct of `pattern` is one of \s, \S,
    \p{L}, \p{M}, \p{N} or an escaped literal (the classes whose meaning class_disagreements covers)."""
    literal = set("rnt'\"-[]()?*+.{}|^$/\\ ")
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            nxt = pattern[i + 1: i + 2]
            if nxt == "p":
                end = pattern.find("}", i)
                if pattern[i: end + 1] not in CLASSES:
                    raise UnsupportedPattern(f"class {pattern[i: end + 1]}")
                i = end + 1
                continue
            if nxt not in literal and nxt not in ("s", "S"):
                raise UnsupportedPattern(f"escape \\{nxt}")
            i += 2
            continue
        if pattern.startswith("[:", i) or pattern.startswith("(?", i) and pattern[i + 2: i + 3] not in (":", "!", "="):
            raise UnsupportedPattern(f"construct at {i}")
        i += 1


# --------------------------------------------------------------------------- encoder
def fast_path_problem(config: dict) -> str | None:
    """Why a tokenizer.json cannot take the fast path (None when it can)."""
    if config.get("normalizer") is not None:
        return "has a normalizer"
    if config.get("truncation") is not None or config.get("padding") is not None:
        return "truncation/padding configured"
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return "pre-tokenizer is not Sequence[Split, ByteLevel]"
    split, bl = steps
    if (split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {})
            or split.get("behavior") != "Isolated" or split.get("invert")):
        return "first pre-tokenizer is not an isolated regex Split"
    if bl.get("type") != "ByteLevel" or bl.get("add_prefix_space") or bl.get("use_regex"):
        return "second pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=False)"
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return "model is not a BPE without dropout"
    if any(not t.get("special") for t in config.get("added_tokens") or []):
        return "non-special added tokens (matched inside text)"
    return None


class FastBPEEncoder:
    """`tokenize_batch(texts)` equal to `Tokenizer.encode(t, add_special_tokens=False).ids` per text
    (with `encode_special_tokens=True`), for tokenizer.json files that pass `fast_path_problem`;
    otherwise it simply calls `tokenizers`.  Single-threaded; `max_cache` distinct pre-tokens memoised."""

    def __init__(self, tokenizer_json: str, max_cache: int = 1 << 20, disagreements: list | None = None):
        from tokenizers import Tokenizer

        with open(tokenizer_json, encoding="utf-8") as f:
            config = json.load(f)
        self._tok = Tokenizer.from_file(tokenizer_json)
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.problem = fast_path_problem(config)
        self._re = self._guard = None
        if self.problem is None:
            import re

            import regex

            pattern = config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
            try:
                check_pattern(pattern)
                self._re = regex.compile(pattern, regex.V0)
            except (UnsupportedPattern, regex.error) as e:
                self.problem = f"pattern not supported ({e})"
            else:
                diff = class_disagreements() if disagreements is None else disagreements
                # stdlib re: ~2x faster than `regex` for a plain character set
                self._guard = re.compile(f"[{_class_body(diff)}]").search if diff else None
        self._model_tokenize = self._tok.model.tokenize
        self._cache: dict[str, list[int]] = {}
        self._max_cache = max_cache
        self.fallback_docs = 0  # documents encoded by `tokenizers` (disagreeing code point or a gap)

    @property
    def fast(self) -> bool:
        return self._re is not None

    def _hf(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _miss(self, piece: str) -> list[int]:
        ids = [t.id for t in self._model_tokenize(byte_level(piece))]
        if len(self._cache) >= self._max_cache:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._re is None:
            return self._hf(texts)
        findall, guard, get, miss = self._re.findall, self._guard, self._cache.get, self._miss
        out = []
        for text in texts:
            if guard is not None and guard(text):
                self.fallback_docs += 1
                out.append(self._hf([text])[0])
                continue
            pieces = findall(text)
            if sum(map(len, pieces)) != len(text):  # a gap: "isolated" Split would emit it as a piece
                self.fallback_docs += 1
                out.append(self._hf([text])[0])
                continue
            parts = list(map(get, pieces))
            if None in parts:
                parts = [p if p is not None else miss(w) for p, w in zip(parts, pieces)]
            out.append(list(chain.from_iterable(parts)))
        return out


class PreprocessEncoder:
    """What preprocessing needs of an HCX hf-backend tokenizer directory (vocab_size, eod, tokenize_batch),
    loaded without megatron-core/torch.  Validates like HCXTokenizer: metadata file, fixed special ids."""

    def __init__(self, path: str):
        from hcx_megatron.tokenizer.train import HF_FILE, read_tokenizer_metadata

        meta_path, meta = read_tokenizer_metadata(path)
        if meta.get("backend") != "hf":
            raise ValueError(f"{meta_path}: backend {meta.get('backend')!r}, PreprocessEncoder needs 'hf'")
        self.encoder = FastBPEEncoder(os.path.join(path, meta.get("model_file") or HF_FILE))
        for i, s in enumerate(SPECIAL_TOKENS):
            got = self.encoder._tok.token_to_id(s)
            if got != i:
                raise ValueError(f"{path}: special token {s} has id {got}, expected {i}")
        self.vocab_size = self.encoder.vocab_size
        self.eod = special_token_id(ENDOFTEXT)
        self.tokenize_batch = self.encoder.tokenize_batch


def load_preprocess_encoder(path: str):
    """PreprocessEncoder for hf-backend directories, None for others (the caller uses HCXTokenizer)."""
    from hcx_megatron.tokenizer.train import METADATA_FILE

    try:
        with open(os.path.join(path, METADATA_FILE)) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError):
        return None
    return PreprocessEncoder(path) if backend == "hf" else None
