#!/usr/bin/env python
"""Merge indexed datasets: python tools/merge_datasets.py --input P1_text_document P2_text_document
--output-prefix OUT_text_document.  Blends (weighted mixing) need no merge: give the pretraining driver
Megatron-style `--data-path 0.3 ko_text_document 0.3 en_text_document 0.4 code_text_document`."""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True, help="merged prefix (without .bin/.idx)")
    a = p.parse_args(argv)
    from hcx_megatron.data.preprocess import PreprocessError, merge_datasets

    try:
        docs, tokens = merge_datasets(a.input, a.output_prefix)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(a.input)} datasets: {docs:,} documents, {tokens:,} tokens -> {a.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
