"""Tokenizer for mock data (`--mock-data`, `--tokenizer-type NullTokenizer --vocab-size N`).

Wraps megatron-core's NullTokenizer library class (text = space separated ids) as a MegatronTokenizerBase so
GPTDatasetConfig accepts it; eod is the last id, as in Megatron-LM.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections import OrderedDict

import megatron.core.tokenizers as megatron_tokenizers
from megatron.core.tokenizers import MegatronTokenizerBase

_CORE_MODULE = "megatron.core.tokenizers.text.libraries.null_tokenizer"


@functools.lru_cache(maxsize=None)
def _core_null_tokenizer_class():
    """megatron-core's NullTokenizer class, loaded from its own file: importing it by name first runs
    megatron.core.tokenizers.text's __init__, which imports transformers (~1.3 s in every process of every mock-data
    run, for a class that needs only `collections`)."""
    if _CORE_MODULE in sys.modules:
        return sys.modules[_CORE_MODULE].NullTokenizer
    path = os.path.join(os.path.dirname(megatron_tokenizers.__file__), "text", "libraries", "null_tokenizer.py")
    if not os.path.isfile(path):  # another megatron-core layout: the plain import
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        return NullTokenizer
    spec = importlib.util.spec_from_file_location("_hcx_megatron_core_null_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NullTokenizer


class NullTokenizer(MegatronTokenizerBase):
    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError("NullTokenizer needs --vocab-size >= 2")
        super().__init__(None, {"library": "null"})
        # megatron's NullTokenizer reserves one extra id for eod beyond vocab_size-1 ids.
        self._core = _core_null_tokenizer_class()(int(vocab_size) - 1)
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
