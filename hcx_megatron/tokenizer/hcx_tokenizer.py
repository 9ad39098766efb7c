"""HCXTokenizer: the tokenizer every hcx_megatron component uses (datasets, drivers, FIM, SFT, export).

A megatron-core `MegatronTokenizerBase` (the type GPTDatasetConfig.tokenizer is declared with in
megatron-core 0.16), over either backend:
  * hf: a Hugging Face `tokenizers` byte-level BPE (tokenizer.json), the default;
  * sentencepiece: BPE/unigram with byte fallback (tokenizer.model).

Special tokens have fixed ids 0..9 (special_tokens.py).  `tokenize(text)` treats their literal
strings as ordinary text; `tokenize_with_special(text)` or building id lists with `special_id()` are
the only ways to emit control ids.

Unpaired surrogates ("\\ud800" in a Python str) have no UTF-8 form: `tokenize` raises ValueError for
them (preprocessing counts such documents as invalid_utf8); pass errors="replace" to map each to U+FFFD.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from functools import cached_property
from typing import Iterable, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from hcx_megatron.tokenizer.special_tokens import (
    ASSISTANT, ENDOFTEXT, ENDOFTURN, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, PAD, SPECIAL_TOKENS,
    SYSTEM, USER, special_token_id,
)
from hcx_megatron.tokenizer.train import HF_FILE, SPM_FILE, read_tokenizer_metadata


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to U+0100.. in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _replace_surrogates(text: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


class HCXTokenizer(MegatronTokenizerBase):
    """Load with `load_tokenizer(dir)`."""

    def __init__(self, path: str):
        meta_path, meta = read_tokenizer_metadata(path)
        backend = meta.get("backend")
        if backend not in ("hf", "sentencepiece"):
            raise ValueError(f"{meta_path}: unknown backend {backend!r}")
        super().__init__(path, {"library": "hcx-" + backend})
        self.metadata = meta
        self.backend = backend
        model_path = os.path.join(path, meta.get("model_file") or (HF_FILE if backend == "hf" else SPM_FILE))
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        if backend == "hf":
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(model_path)
            self._tok.encode_special_tokens = True  # literal "<|user|>" in text is text
            self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=model_path)
            self._vocab_size = self._sp.get_piece_size()
        for i, s in enumerate(SPECIAL_TOKENS):
            got = self._token_to_id(s)
            if got != i:
                raise ValueError(f"{model_path}: special token {s} has id {got}, expected {i}")
        # megatron-core datasets hash this into their cache keys: include the model file digest so a
        # retrained tokenizer never reuses stale sample indices.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("backend", backend), ("model_sha256", digest),
             ("vocab_size", self._vocab_size)])

    def __setstate__(self, state: dict) -> None:
        # tokenizers.Tokenizer pickles without its encode_special_tokens flag; without this, a DataLoader
        # worker started by spawn would turn literal "<|user|>" text into the control id.
        self.__dict__.update(state)
        if self.backend == "hf":
            self._tok.encode_special_tokens = True

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str, errors: str = "strict") -> list[int]:
        """Plain text -> ids. Special-token literals are encoded as ordinary text."""
        text = self._prepare(text, errors)
        if self.backend == "hf":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], errors: str = "strict") -> list[list[int]]:
        texts = [self._prepare(t, errors) for t in texts]
        if self.backend == "hf":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._sp.encode(texts)

    def tokenize_with_special(self, text: str, errors: str = "strict") -> list[int]:
        """Like tokenize, but literal special-token strings become their control ids (trusted input only)."""
        text = self._prepare(text, errors)
        out: list[int] = []
        pos = 0
        while pos <= len(text):
            nxt, which = len(text), None
            for s in SPECIAL_TOKENS:
                j = text.find(s, pos)
                if j != -1 and j < nxt:
                    nxt, which = j, s
            if nxt > pos:
                out.extend(self.tokenize(text[pos:nxt]))
            if which is None:
                break
            out.append(special_token_id(which))
            pos = nxt + len(which)
        return out

    @staticmethod
    def _prepare(text: str, errors: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            if errors == "replace":
                return _replace_surrogates(text)
            raise ValueError(
                f"text has an unpaired surrogate at char {e.start} (U+{ord(text[e.start]):04X}): it has no "
                "UTF-8 form, so it cannot be tokenized losslessly; pass errors='replace' to map it to U+FFFD"
            ) from None
        return text

    # ------------------------------------------------------------------ decoding
    def detokenize(self, ids: Iterable[int]) -> str:
        """ids -> text; special ids appear as their literal strings; partial UTF-8 gives U+FFFD."""
        ids = [int(i) for i in ids]
        if self.backend == "hf":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of ids (special ids as their literal UTF-8)."""
        table = self._id_bytes
        return b"".join(table[int(i)] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_bytes[int(token_id)]

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        out: list[bytes] = []
        if self.backend == "hf":
            inv = {c: b for b, c in byte_to_unicode().items()}
            vocab = self._tok.get_vocab(with_added_tokens=True)
            by_id = [""] * self._vocab_size
            for s, i in vocab.items():
                by_id[i] = s
            for i, s in enumerate(by_id):
                out.append(s.encode("utf-8") if i < len(SPECIAL_TOKENS) else bytes(inv[c] for c in s))
        else:
            for i in range(self._vocab_size):
                piece = self._sp.id_to_piece(i)
                if self._sp.is_byte(i):
                    out.append(bytes([int(piece[3:5], 16)]))
                elif self._sp.is_control(i):
                    out.append(piece.encode("utf-8"))
                elif self._sp.is_unknown(i):
                    out.append(b"")
                else:
                    out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def offsets(self, ids: list[int], text: str) -> list[int]:
        """Character offset in `text` where each token starts (text must be detokenize(ids))."""
        starts, pos_b = [], 0
        byte_to_char = {}
        b = 0
        for ci, ch in enumerate(text):
            byte_to_char[b] = ci
            b += len(ch.encode("utf-8"))
        for i in ids:
            # A token starting inside a multi-byte character maps to that character.
            cand = pos_b
            while cand not in byte_to_char and cand > 0:
                cand -= 1
            starts.append(byte_to_char.get(cand, len(text)))
            pos_b += len(self.token_bytes(i))
        return starts

    # ------------------------------------------------------------------ vocabulary
    def _token_to_id(self, token: str) -> int | None:
        if self.backend == "hf":
            return self._tok.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        """Real (unpadded) vocabulary size; pad_vocab_size in hcx_megatron.config.model pads it."""
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        if self.backend == "hf":
            return self._tok.get_vocab(with_added_tokens=True)
        return {self._sp.id_to_piece(i): i for i in range(self._vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: s for s, i in self.vocab.items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(SPECIAL_TOKENS)}

    def special_id(self, name: str) -> int:
        """Id of a special token by short name ("user", "fim_prefix", "eod", ...) or literal string."""
        return special_token_id(name)

    eod = property(lambda self: special_token_id(ENDOFTEXT), doc="<|endoftext|>: ends every document")
    eos = eod
    pad = property(lambda self: special_token_id(PAD), doc="<|pad|>: never inside documents")
    fim_prefix_id = property(lambda self: special_token_id(FIM_PREFIX))
    fim_middle_id = property(lambda self: special_token_id(FIM_MIDDLE))
    fim_suffix_id = property(lambda self: special_token_id(FIM_SUFFIX))
    fim_pad_id = property(lambda self: special_token_id(FIM_PAD))
    system_id = property(lambda self: special_token_id(SYSTEM))
    user_id = property(lambda self: special_token_id(USER))
    assistant_id = property(lambda self: special_token_id(ASSISTANT))
    endofturn_id = property(lambda self: special_token_id(ENDOFTURN))

    def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
                            **kwargs) -> list[int]:
        """Minimal rendering: <|role|> content <|endofturn|> per message; the SFT code owns the
        canonical chat format and builds on the same ids."""
        role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        ids: list[int] = []
        for m in conversation:
            if m.get("role") not in role_ids:
                raise ValueError(f"unknown chat role {m.get('role')!r}; expected system/user/assistant")
            ids.append(role_ids[m["role"]])
            ids.extend(self.tokenize(m.get("content", "")))
            ids.append(self.endofturn_id)
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids

    def __repr__(self) -> str:
        return f"HCXTokenizer(path={self.path!r}, backend={self.backend}, vocab_size={self._vocab_size})"
