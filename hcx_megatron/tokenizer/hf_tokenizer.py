"""HuggingFaceTokenizer: an open model's own tokenizer directory (`tokenizer.json`) as the run's tokenizer.

`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR` (Megatron-LM's name). Unlike HCXTokenizer the
vocabulary is not ours, so nothing has a fixed id:

  * `eod` (= `eos`) is the tokenizer's own `eos_token` (tokenizer_config.json or special_tokens_map.json); a
    directory without one is rejected, because every document ends with it (`--append-eod`);
  * `pad` is its `pad_token`, or -1 when it has none (megatron-core's datasets then use their own sentinel);
  * the HCX control tokens (chat roles, `<|endofturn|>`, FIM) are looked up by their literal strings
    (special_tokens.py) in the vocabulary, wherever they are. A token the run needs but the vocabulary lacks
    raises MissingSpecialTokenError naming the token and the fix (`tools/extend_vocab.py
    --add-hcx-special-tokens`, which also resizes the checkpoint) the first time it is asked for, so plain
    pretraining never needs them.

`tokenize(text)` encodes special-token literals as ordinary text (as HCXTokenizer does): control ids come only
from `special_id()`, so a user typing "<|user|>" cannot inject a role.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from functools import cached_property
from typing import Iterable, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from hcx_megatron.tokenizer.special_tokens import (
    ASSISTANT, ENDOFTEXT, ENDOFTURN, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, SPECIAL_TOKEN_NAMES, SYSTEM, USER,
)

HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class MissingSpecialTokenError(ValueError):
    """The run needs an HCX control token (chat role, end of turn, FIM) that the HF vocabulary lacks."""


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_hf_special_tokens(path: str) -> dict[str, str]:
    """{"eos_token": "...", "pad_token": ..., ...} from tokenizer_config.json, then special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in HF_CONFIG_FILES:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            content = _token_content(data.get(key))
            if content is not None and key not in out:
                out[key] = content
    return out


class HuggingFaceTokenizer(MegatronTokenizerBase):
    """Load with `build_tokenizer("HuggingFaceTokenizer", dir)`."""

    def __init__(self, path: str):
        model_path = os.path.join(path, HF_TOKENIZER_FILE)
        if not os.path.exists(model_path):
            hint = (" (it has tokenizer.model: a sentencepiece-only tokenizer; save it with transformers' fast "
                    "tokenizer to get tokenizer.json)") if os.path.exists(os.path.join(path, "tokenizer.model")) else ""
            raise FileNotFoundError(f"--tokenizer-model {path}: no {HF_TOKENIZER_FILE}; --tokenizer-type "
                                    f"HuggingFaceTokenizer needs a Hugging Face tokenizers file{hint}")
        super().__init__(path, {"library": "huggingface"})
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(model_path)
        self._tok.encode_special_tokens = True  # literal "<|user|>" in text is text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids need not be contiguous (added tokens may sit above the model vocabulary): the embedding must
        # have a row for the largest one.
        self._vocab_size = max(vocab.values()) + 1
        self.special_token_strings = read_hf_special_tokens(path)
        eos = self.special_token_strings.get("eos_token")
        if eos is None:
            raise ValueError(f"--tokenizer-model {path}: no eos_token in {' or '.join(HF_CONFIG_FILES)}; the "
                             "end-of-document id (eod, appended by --append-eod) is the tokenizer's eos_token: set "
                             '"eos_token" in tokenizer_config.json')
        self._eod = self._require_id(eos, "eos_token")
        pad = self.special_token_strings.get("pad_token")
        self._pad = self._require_id(pad, "pad_token") if pad is not None else -1
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        # megatron-core datasets hash this into their cache keys: a changed tokenizer.json never reuses indices.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_sha256", digest), ("vocab_size", self._vocab_size)])

    def _require_id(self, token: str, field: str) -> int:
        got = self._tok.token_to_id(token)
        if got is None:
            raise ValueError(f"--tokenizer-model {self.path}: {field} {token!r} is not in {HF_TOKENIZER_FILE}'s "
                             "vocabulary")
        return got

    def __setstate__(self, state: dict) -> None:
        # tokenizers.Tokenizer pickles without encode_special_tokens (DataLoader workers started by spawn).
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _prepare(text: str, errors: str) -> str:
        from hcx_megatron.tokenizer.hcx_tokenizer import HCXTokenizer

        return HCXTokenizer._prepare(text, errors)  # the same unpaired-surrogate rule as our tokenizer

    def tokenize(self, text: str, errors: str = "strict") -> list[int]:
        """Plain text -> ids. Special-token literals are encoded as ordinary text."""
        return self._tok.encode(self._prepare(text, errors), add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str], errors: str = "strict") -> list[list[int]]:
        texts = [self._prepare(t, errors) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    # ------------------------------------------------------------------ decoding
    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        """Exact bytes of every id; only byte-level BPE vocabularies have them."""
        from hcx_megatron.tokenizer.hcx_tokenizer import byte_to_unicode

        with open(os.path.join(self.path, HF_TOKENIZER_FILE), encoding="utf-8") as f:
            decoder = (json.load(f).get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise ValueError(f"--tokenizer-model {self.path}: exact token bytes (needed by --fim-split-unit char) "
                             f"exist only for byte-level BPE tokenizers; this one's decoder is {decoder!r}: use "
                             "--fim-split-unit token")
        inv = {c: b for b, c in byte_to_unicode().items()}
        out = [b""] * self._vocab_size
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for s, i in self._tok.get_vocab(with_added_tokens=True).items():
            out[i] = s.encode("utf-8") if s in added or any(c not in inv for c in s) else bytes(inv[c] for c in s)
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_bytes
        return b"".join(table[int(i)] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_bytes[int(token_id)]

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (unpadded); pad_vocab_size in hcx_megatron.config.model pads it."""
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: s for s, i in self.vocab.items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        """The HCX control tokens this vocabulary has, literal -> id (eod under <|endoftext|>)."""
        out = {ENDOFTEXT: self._eod}
        for literal in set(SPECIAL_TOKEN_NAMES.values()) - {ENDOFTEXT}:
            got = self._tok.token_to_id(literal)
            if got is not None:
                out[literal] = got
        return out

    def special_id(self, name: str) -> int:
        """Id of an HCX control token by short name ("user", "fim_prefix", "eod", ...) or literal string.
        eod/<|endoftext|> is the tokenizer's eos; the others must be in the vocabulary."""
        literal = SPECIAL_TOKEN_NAMES.get(name, name)
        if literal == ENDOFTEXT:
            return self._eod
        got = self._tok.token_to_id(literal)
        if got is None:
            raise MissingSpecialTokenError(
                f"--tokenizer-model {self.path}: the tokenizer has no {literal} token, which this run needs (chat "
                "rendering needs <|system|> <|user|> <|assistant|> <|endofturn|>; FIM needs the <|fim_*|> tokens). "
                "Add them with `python tools/extend_vocab.py --tokenizer-model DIR --load CKPT "
                "--add-hcx-special-tokens --output-tokenizer NEW_DIR --save NEW_CKPT`, which also resizes the "
                "checkpoint's embedding and output layers, then train with NEW_DIR and NEW_CKPT")
        return got

    @property
    def eod(self) -> int:
        return self._eod

    eos = eod

    @property
    def pad(self) -> int:
        return self._pad

    fim_prefix_id = property(lambda self: self.special_id(FIM_PREFIX))
    fim_middle_id = property(lambda self: self.special_id(FIM_MIDDLE))
    fim_suffix_id = property(lambda self: self.special_id(FIM_SUFFIX))
    fim_pad_id = property(lambda self: self.special_id(FIM_PAD))
    system_id = property(lambda self: self.special_id(SYSTEM))
    user_id = property(lambda self: self.special_id(USER))
    assistant_id = property(lambda self: self.special_id(ASSISTANT))
    endofturn_id = property(lambda self: self.special_id(ENDOFTURN))

    def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
                            **kwargs) -> list[int]:
        from hcx_megatron.data.chat import render_ids

        return render_ids(self, conversation, add_generation_prompt=add_generation_prompt).ids

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer(path={self.path!r}, vocab_size={self._vocab_size}, eod={self._eod})"
