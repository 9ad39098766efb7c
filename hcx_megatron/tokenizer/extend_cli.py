"""tools/extend_vocab.py: add morpheme-aware Korean tokens to an open model's byte-level BPE tokenizer and resize
its megatron checkpoint to match.

    python tools/extend_vocab.py --tokenizer-model hf_tok/ --corpus ko.jsonl --num-new-tokens 8000 \\
        --output-tokenizer tok_ko/ [--add-hcx-special-tokens] \\
        [--load imported/ --save imported_ko/ [--target-tensor-parallel-size 2]]
    python tools/extend_vocab.py --load CKPT --save NEW_CKPT --new-vocab-size N     # checkpoint only

Then: `--tokenizer-type HuggingFaceTokenizer --tokenizer-model tok_ko/ --load imported_ko/ --finetune`.
The rules (what encodes identically, how new rows are initialised) are in hcx_megatron/tokenizer/extend.py and
hcx_megatron/convert/resize_vocab.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", default=None, help="HF tokenizer directory (tokenizer.json, byte-level BPE)")
    g.add_argument("--corpus", nargs="+", default=[], help="Korean JSONL (.gz/.zst) files to find morphemes in")
    g.add_argument("--json-keys", nargs="+", default=["text"])
    g.add_argument("--max-docs", type=int, default=None, help="read at most this many corpus documents")
    g.add_argument("--num-new-tokens", type=int, default=0,
                   help="vocabulary entries to add (morphemes, their syllables and intermediate merges)")
    g.add_argument("--add-hcx-special-tokens", action="store_true",
                   help="also add the HCX control tokens the tokenizer lacks (chat roles, <|endofturn|>, FIM, "
                        "<|pad|>) as special added tokens; eod stays the tokenizer's eos")
    g.add_argument("--output-tokenizer", default=None, help="new tokenizer directory (must not exist)")
    c = p.add_argument_group("checkpoint")
    c.add_argument("--load", default=None, help="megatron checkpoint (from-hf import or a --save root)")
    c.add_argument("--save", default=None, help="checkpoint root to write with the resized vocabulary")
    c.add_argument("--new-vocab-size", type=int, default=None,
                   help="checkpoint-only mode: resize to this vocabulary (without --tokenizer-model)")
    c.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="TP whose Megatron padding sizes the vocabulary tensors (default: the checkpoint's)")
    c.add_argument("--target-pipeline-parallel-size", type=int, default=None)
    c.add_argument("--vocab-multiple", type=int, default=None,
                   help="round the checkpoint's vocab_size up to a multiple of this (e.g. 1024 = 128 x TP8): Megatron "
                        "then pads it the same at every TP dividing it/128, so the checkpoint loads at any of those "
                        "TPs; the extra rows get the same mean initialisation and are unused by the tokenizer")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if (a.load is None) != (a.save is None):
        raise SystemExit("--load and --save go together (the checkpoint to resize and where to write it)")
    summary: dict = {}
    new_vocab = a.new_vocab_size
    keep_rows = None
    if a.tokenizer_model:
        if not a.output_tokenizer:
            raise SystemExit("--tokenizer-model needs --output-tokenizer DIR")
        if a.num_new_tokens > 0 and not a.corpus:
            raise SystemExit("--num-new-tokens needs --corpus FILE ... (Korean text to find morphemes in)")
        if a.new_vocab_size is not None:
            raise SystemExit("--new-vocab-size is for checkpoint-only mode; with --tokenizer-model the new "
                             "tokenizer's size is used")
        from hcx_megatron.data.jsonl import iter_texts
        from hcx_megatron.tokenizer.extend import extend_tokenizer

        texts = (t for d in iter_texts(a.corpus, a.json_keys, max_docs=a.max_docs) for t in d.texts)
        result = extend_tokenizer(a.tokenizer_model, texts, a.output_tokenizer, a.num_new_tokens,
                                  add_hcx_special_tokens=a.add_hcx_special_tokens)
        summary["tokenizer"] = dataclasses.asdict(result)
        summary["tokenizer"].pop("unreachable")
        summary["tokenizer"]["unreachable_tokens"] = len(result.unreachable)
        new_vocab, keep_rows = result.new_vocab_size, result.old_vocab_size
    elif a.load and a.new_vocab_size is None:
        raise SystemExit("checkpoint-only mode needs --new-vocab-size N (or give --tokenizer-model to extend)")
    if a.load:
        from hcx_megatron.convert.dist_reader import DistCheckpointReader
        from hcx_megatron.convert.resize_vocab import resize_checkpoint_vocab

        ckpt_vocab = int(DistCheckpointReader(a.load).config["model"]["vocab_size"])
        # An open model's embedding may be larger than its tokenizer: keep its size when the new tokens fit,
        # but re-initialise the rows from the old tokenizer's size on, which new ids now use.
        target_vocab = max(new_vocab, ckpt_vocab)
        if a.vocab_multiple:
            target_vocab = -(-target_vocab // a.vocab_multiple) * a.vocab_multiple
        res = resize_checkpoint_vocab(a.load, a.save, target_vocab, tp=a.target_tensor_parallel_size,
                                      pp=a.target_pipeline_parallel_size,
                                      keep_rows=min(keep_rows, ckpt_vocab) if keep_rows else None)
        summary["checkpoint"] = dataclasses.asdict(res)
        tok = a.output_tokenizer or "TOKENIZER_DIR"
        summary["continue_with"] = (
            f"torchrun --nproc-per-node {res.target_tensor_parallel_size} -m hcx_megatron.pretrain "
            f"--model-config {res.model_yaml} --tensor-model-parallel-size {res.target_tensor_parallel_size} "
            f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {tok} --load {a.save} --finetune ...")
    if not summary:
        raise SystemExit("nothing to do: give --tokenizer-model (extend a tokenizer) and/or --load/--save")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
