"""Tokenizer for mock data (`--mock-data`, `--tokenizer-type NullTokenizer --vocab-size N`).

The conventions of Megatron-LM's NullTokenizer (text = space-separated ids, eod = the last id) as a
MegatronTokenizerBase, so GPTDatasetConfig accepts it. Written out here rather than wrapping megatron-core's
library class: importing that class imports megatron.core.tokenizers.text, which imports transformers (~1.6 s in
every process of every mock-data run, for four one-line methods).
"""

from __future__ import annotations

from collections import OrderedDict

from megatron.core.tokenizers import MegatronTokenizerBase


class NullTokenizer(MegatronTokenizerBase):
    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError("NullTokenizer needs --vocab-size >= 2")
        super().__init__(None, {"library": "null"})
        self._vocab_size = int(vocab_size)
        self.unique_identifiers = OrderedDict([("class", "NullTokenizer"), ("vocab_size", self._vocab_size)])

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split(" ")]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab(self):
        raise NotImplementedError("NullTokenizer has no vocabulary")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    eos = eod

    @property
    def pad(self) -> int:
        return -1  # no pad id: megatron-core's datasets then fall back to their own pad sentinel

    def apply_chat_template(self, *a, **k):
        raise NotImplementedError("NullTokenizer has no chat template")
