"""hcx-preprocess-data / tools/preprocess_data.py

python tools/preprocess_data.py --input X.jsonl --output-prefix P --tokenizer-model DIR \
    --json-keys text --append-eod --workers N [--strict]
writes P_text_document.bin/.idx (one pair per --json-keys key).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hcx_megatron.data.preprocess import PreprocessConfig, PreprocessError, preprocess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="JSONL -> megatron-core indexed dataset (.bin/.idx)", allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.jsonl, .gz, .zst), concatenated in order")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", default=None, help="tokenizer directory (tools/train_tokenizer.py)")
    p.add_argument("--tokenizer-type", default=None, help="HCXTokenizer (default), HuggingFaceTokenizer "
                   "(a tokenizer.json directory; eod = its eos) or NullTokenizer")
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad line (file:line, exit 1) instead of skipping it")
    p.add_argument("--batch-lines", type=int, default=128, help="lines per work item")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PreprocessConfig(inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model,
                           tokenizer_type=a.tokenizer_type, vocab_size=a.vocab_size, json_keys=a.json_keys,
                           append_eod=a.append_eod, workers=a.workers, strict=a.strict,
                           batch_lines=a.batch_lines, progress=not a.no_progress)
    try:
        s = preprocess(cfg)
    except (PreprocessError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(s.format(), file=sys.stderr)
    if a.summary_json:
        with open(a.summary_json, "w") as f:
            json.dump({"docs": s.docs, "tokens": s.tokens, "input_bytes": s.input_bytes, "seconds": s.seconds,
                       "skipped": s.skipped, "examples": s.examples, "outputs": s.outputs, "dtype": s.dtype}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
