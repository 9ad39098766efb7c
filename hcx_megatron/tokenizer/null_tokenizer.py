"""Tokenizer for mock data (`--mock-data`, `--tokenizer-type NullTokenizer --vocab-size N`).

Wraps megatron-core's NullTokenizer library class (text = space separated ids) as a
MegatronTokenizerBase so GPTDatasetConfig accepts it; eod is the last id, as in Megatron-LM.
"""

from __future__ import annotations

from collections import OrderedDict

from megatron.core.tokenizers import MegatronTokenizerBase
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as _CoreNull


class NullTokenizer(MegatronTokenizerBase):
    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError("NullTokenizer needs --vocab-size >= 2")
        super().__init__(None, {"library": "null"})
        # megatron's NullTokenizer reserves one extra id for eod beyond vocab_size-1 ids.
        self._core = _CoreNull(int(vocab_size) - 1)
        self.unique_identifiers = OrderedDict([("class", "NullTokenizer"), ("vocab_size", int(vocab_size))])

    def tokenize(self, text: str) -> list[int]:
        return self._core.text_to_ids(text)

    def detokenize(self, ids) -> str:
        return self._core.ids_to_text([int(i) for i in ids])

    @property
    def vocab(self):
        raise NotImplementedError("NullTokenizer has no vocabulary")

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def eod(self) -> int:
        return self._core.eod

    eos = eod

    @property
    def pad(self) -> int:
        return -1  # no pad id: megatron-core's datasets then fall back to their own pad sentinel

    def apply_chat_template(self, *a, **k):
        raise NotImplementedError("NullTokenizer has no chat template")
