#!/usr/bin/env python
"""Tokenizer report: per language, tokens per document and per 1,000 characters, bytes per token and the
share of token boundaries inside Korean words that fall on analyser morpheme boundaries, for the HCX
tokenizer and baselines trained in the same run on the same data and vocabulary size:
  hcx-hf          byte-level BPE, merges inside Korean morphemes (HF tokenizers; the default)
  hf-plain        byte-level BPE without the morpheme split
  hcx-spm-bpe     sentencepiece BPE + byte fallback, morpheme split via pretokenization_delimiter
  spm-unigram     sentencepiece unigram + byte fallback, no morpheme split
Every --eval-every'th document of each file is held out from training and is what gets measured.

python tools/tokenizer_report.py --input ko.jsonl en.jsonl code.jsonl --vocab-size 32000 --output report.md
"""

import argparse
import os
import sys
import tempfile
import time

CONFIGS = {
    "hcx-hf": dict(backend="hf", model_type="bpe", morpheme_split=True),
    "hf-plain": dict(backend="hf", model_type="bpe", morpheme_split=False),
    "hcx-spm-bpe": dict(backend="sentencepiece", model_type="bpe", morpheme_split=True),
    "spm-unigram": dict(backend="sentencepiece", model_type="unigram", morpheme_split=False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files; the language is the file stem")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-size", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=10, help="hold out every N-th document for evaluation")
    p.add_argument("--max-docs", type=int, default=None, help="per input file")
    p.add_argument("--tokenizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--work-dir", default=None, help="keep the trained tokenizers here (default: temp dir)")
    p.add_argument("--output", default=None, help="write the markdown report here")
    a = p.parse_args(argv)

    from hcx_megatron.data.jsonl import iter_texts
    from hcx_megatron.tokenizer import load_tokenizer
    from hcx_megatron.tokenizer.morpheme import MorphemeSegmenter
    from hcx_megatron.tokenizer.report import ReportRow, evaluate, markdown_table
    from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

    train_texts, eval_texts = [], {}
    for path in a.input:
        lang = os.path.basename(path).split(".")[0]
        for i, doc in enumerate(iter_texts([path], a.json_keys, max_docs=a.max_docs)):
            text = "\n".join(doc.texts)
            (eval_texts.setdefault(lang, []) if i % a.eval_every == 0 else train_texts).append(text)
    n_train_mb = sum(len(t.encode()) for t in train_texts) / 1e6
    print(f"train: {len(train_texts)} docs, {n_train_mb:.2f} MB; eval: "
          + ", ".join(f"{k} {len(v)} docs" for k, v in eval_texts.items()), file=sys.stderr)

    seg = MorphemeSegmenter()
    morph = {lang: seg.boundaries_many(texts) for lang, texts in eval_texts.items()}
    work = a.work_dir or tempfile.mkdtemp(prefix="tokreport-")
    rows, timing = [], {}
    for name in a.tokenizers:
        out = os.path.join(work, name)
        t0 = time.perf_counter()
        meta = train_tokenizer(train_texts, out, TrainConfig(vocab_size=a.vocab_size, **CONFIGS[name]))
        timing[name] = (time.perf_counter() - t0, meta["training"]["segment_seconds"])
        tok = load_tokenizer(out)
        print(f"{name}: trained in {timing[name][0]:.1f} s (analyser {timing[name][1]:.1f} s), "
              f"vocab {tok.vocab_size}", file=sys.stderr)
        unk = tok.vocab_size if tok.backend == "hf" else tok._sp.unk_id()
        for lang, texts in eval_texts.items():
            rows.append(ReportRow(name, lang, evaluate(tok, texts, None, morph_cache=morph[lang], unk_id=unk),
                                  tok.vocab_size, timing[name][0]))
    table = markdown_table(rows)
    lines = [f"Trained on {len(train_texts)} documents ({n_train_mb:.2f} MB) of {', '.join(a.input)}; "
             f"measured on the held-out every {a.eval_every}th document; requested vocabulary {a.vocab_size:,}.",
             "", table, "", "| tokenizer | training time (s) | of which morpheme analysis (s) | unk tokens |",
             "|---|---:|---:|---:|"]
    for name in a.tokenizers:
        unk = sum(r.stats.unk for r in rows if r.name == name)
        lines.append(f"| {name} | {timing[name][0]:.1f} | {timing[name][1]:.1f} | {unk} |")
    report = "\n".join(lines)
    print(report)
    if a.output:
        with open(a.output, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
