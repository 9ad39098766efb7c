"""hcx-train-tokenizer / tools/train_tokenizer.py

python tools/train_tokenizer.py --input A.jsonl [B.jsonl ...] --json-keys text --vocab-size N \
    --output DIR [--backend hf|sentencepiece]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an HCX byte-level BPE tokenizer (Korean morpheme-aware)",
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose strings are training text")
    p.add_argument("--vocab-size", type=int, default=100_000)
    p.add_argument("--output", required=True, help="tokenizer directory to write (replaced atomically)")
    p.add_argument("--backend", choices=["hf", "sentencepiece"], default="hf")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece only; unigram exists as a baseline for tools/tokenizer_report.py")
    p.add_argument("--no-morpheme-split", action="store_true",
                   help="plain byte-level BPE (baseline): merges may cross Korean morpheme boundaries")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many documents per input")
    p.add_argument("--kiwi-workers", type=int, default=1, help="threads of the Korean morpheme analyser")
    p.add_argument("--quiet", action="store_true")
    return p


def iter_training_texts(inputs, keys, max_docs=None):
    from hcx_megatron.data.jsonl import iter_texts

    for path in inputs:
        for doc in iter_texts([path], keys, max_docs=max_docs):
            yield from doc.texts


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    cfg = TrainConfig(vocab_size=a.vocab_size, backend=a.backend, model_type=a.model_type,
                      morpheme_split=not a.no_morpheme_split, min_frequency=a.min_frequency,
                      kiwi_workers=a.kiwi_workers)
    t0 = time.perf_counter()
    try:
        meta = train_tokenizer(iter_training_texts(a.input, a.json_keys, a.max_docs), a.output, cfg,
                               inputs=a.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr = meta["training"]
    print(json.dumps({
        "output": a.output, "backend": meta["backend"], "vocab_size": meta["vocab_size"],
        "docs": tr["docs"], "mb": round(tr["bytes"] / 1e6, 2), "morpheme_boundaries": tr["morpheme_boundaries"],
        "segment_s": round(tr["segment_seconds"], 1), "train_s": round(tr["train_seconds"], 1),
        "total_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
