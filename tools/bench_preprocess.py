#!/usr/bin/env python
"""Preprocessing and tokenizer throughput (numbers, not a test).

  * against Megatron-LM's own tools/preprocess_data.py (tag core_v0.16.1, run from --megatron-lm, default
    .peers/Megatron-LM; skipped with a message when absent): both CLIs as subprocesses on one JSONL made of
    the corpus files concatenated --replicate times, same tokenizer (Megatron-LM reads it with
    --tokenizer-type HuggingFaceTokenizer), --compare-workers workers, runs alternating, best of
    --compare-repeats: wall s (start-up included), MB/s, CPU s, ratio, and whether the .bin/.idx are
    byte-identical.  Also ours with HCX_PREPROCESS_SLOW=1 (HCXTokenizer = `tokenizers` encoder, imports
    megatron-core/torch) and the levers alone: import cost, encoder MB per CPU-second, writer;

  * tools/preprocess_data.py pipeline on the shared corpus with --workers 1 and 2: docs/s, MB/s, tokens/s
    (1 worker is the baseline; both measured in this run);
  * encode throughput of HCXTokenizer (single call per document, and batched) against plain HF
    `tokenizers` loading the same tokenizer.json, on the same text (+ sentencepiece if given);
  * the Kiwi morpheme analyser on the Korean text: why segmentation happens at training time only.

python tools/bench_preprocess.py --corpus-dir ../shared/corpus --tokenizer-model DIR [--spm-tokenizer-model DIR]
python tools/bench_preprocess.py --tokenizer-model DIR --compare-only   # just the Megatron-LM comparison

Getting the peer (never copied into the repository; /.peers/ is git-ignored):
  git --git-dir=<mirror of NVIDIA/Megatron-LM> archive core_v0.16.1 tools/preprocess_data.py megatron/training \
      megatron/legacy megatron/rl megatron/post_training | tar -x -C .peers/Megatron-LM
  pip install --no-deps --target .peers/pydeps triton   # megatron.training imports it; only on the peer's path
megatron-core itself is the installed 0.16.1.
"""

import argparse
import filecmp
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(paths):
    from hcx_megatron.data.jsonl import iter_texts

    return [t for p in paths for d in iter_texts([p]) for t in d.texts]


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus reaped children (pool workers)."""
    import resource

    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru_c.ru_utime + ru_c.ru_stime


def _best(fn, repeats):
    """(best wall s, median wall s, CPU s of the best-wall run). On a shared machine wall time depends on
    other users' load; CPU seconds do much less, so both are reported."""
    runs = []
    for _ in range(repeats):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0, _cpu_seconds() - c0))
    best = min(runs)
    return best[0], statistics.median(r[0] for r in runs), best[1]


def _timed(cmd, env=None):
    """(wall s, CPU s of the child and its children) of a subprocess; raises on failure."""
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def compare_with_megatron_lm(a, paths, work, results) -> None:
    peer = os.path.join(a.megatron_lm, "tools", "preprocess_data.py")
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "wb") as out:
        for _ in range(a.replicate):
            for p in paths:
                with open(p, "rb") as f:
                    out.write(f.read())
    mb = os.path.getsize(corpus) / 1e6
    print(f"\ncomparison corpus: {', '.join(os.path.basename(p) for p in paths)} concatenated {a.replicate}x "
          f"-> {corpus} ({mb:.2f} MB)")
    w = str(a.compare_workers)
    ours = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
            "--tokenizer-model", a.tokenizer_model, "--json-keys", "text", "--append-eod", "--workers", w,
            "--no-progress", "--output-prefix"]
    runs = {"ours": (ours + [os.path.join(work, "ours")], None),
            "ours, HCX_PREPROCESS_SLOW=1": (ours + [os.path.join(work, "slow")],
                                            dict(os.environ, HCX_PREPROCESS_SLOW="1"))}
    if os.path.isfile(peer):
        env = dict(os.environ)
        deps = a.peer_pythonpath
        if deps and os.path.isdir(deps):
            env["PYTHONPATH"] = deps + os.pathsep + env.get("PYTHONPATH", "")
        runs["Megatron-LM tools/preprocess_data.py"] = (
            [sys.executable, peer, "--input", corpus, "--output-prefix", os.path.join(work, "mlm"),
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", a.tokenizer_model,
             "--json-keys", "text", "--append-eod", "--workers", w, "--log-interval", "1000000000"], env)
    else:
        print(f"Megatron-LM peer not found at {peer}: skipping it (see this script's docstring to get it)")
    best: dict = {}
    for _ in range(a.compare_repeats):  # alternate, keep the best wall time of each
        for name, (cmd, env) in runs.items():
            wall, cpu = _timed(cmd, env)
            print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} CPU s  (load {os.getloadavg()[0]:.1f})", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    mlm = best.get("Megatron-LM tools/preprocess_data.py")
    print(f"\n{mb:.1f} MB, --workers {w}, best of {a.compare_repeats} alternating runs, wall includes start-up\n"
          "| tool | wall s | MB/s | CPU s | MB per CPU-s | wall vs Megatron-LM | CPU vs Megatron-LM |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    results["compare"] = {"mb": mb, "workers": a.compare_workers, "repeats": a.compare_repeats, "runs": {}}
    for name, (wall, cpu) in best.items():
        rw = f"{mlm[0] / wall:.2f}x" if mlm else "—"
        rc = f"{mlm[1] / cpu:.2f}x" if mlm else "—"
        results["compare"]["runs"][name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"| {name} | {wall:.2f} | {mb / wall:.2f} | {cpu:.2f} | {mb / cpu:.2f} | {rw} | {rc} |")
    outs = [os.path.join(work, n + "_text_document") for n in ("ours", "slow", "mlm")]
    outs = [o for o in outs if os.path.exists(o + ".bin")]
    same = all(filecmp.cmp(outs[0] + e, o + e, shallow=False) for o in outs[1:] for e in (".bin", ".idx"))
    results["compare"]["byte_identical"] = same
    print(f"outputs {', '.join(os.path.basename(o) for o in outs)}: {'byte-identical' if same else 'DIFFER'}")

    # ---- the levers on their own
    imp = [sys.executable, "-c", "import hcx_megatron.tokenizer.hcx_tokenizer, megatron.core.datasets.indexed_dataset"]
    light = [sys.executable, "-c", "import hcx_megatron.data.preprocess, hcx_megatron.tokenizer.fast_bpe, tokenizers, "
                                   "regex, tqdm"]
    t_imp = min(_timed(imp)[0] for _ in range(2))
    t_light = min(_timed(light)[0] for _ in range(2))
    print(f"\nstart-up: importing HCXTokenizer + megatron-core's writer (torch) {t_imp:.2f} s wall; what the "
          f"preprocessing CLI imports now {t_light:.2f} s")
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from hcx_megatron.data.indexed_writer import IndexedDatasetWriter

    ds = IndexedDataset(outs[0])
    docs = [np.asarray(ds[i]) for i in range(len(ds))]
    wt = {}
    for name, cls in (("megatron-core IndexedDatasetBuilder", lambda p, d: IndexedDatasetBuilder(p, dtype=d)),
                      ("hcx IndexedDatasetWriter", IndexedDatasetWriter)):
        c0 = time.process_time()
        b = cls(os.path.join(work, "wr.bin"), ds.index.dtype)
        for d in docs:
            b.add_document(d, [d.size])
        b.finalize(os.path.join(work, "wr.idx"))
        wt[name] = time.process_time() - c0
    print("writer, same ids, CPU s: " + ", ".join(f"{k} {v:.3f}" for k, v in wt.items()))
    results["compare"]["import_s"] = {"hcx_tokenizer+megatron": t_imp, "preprocess_cli": t_light}
    results["compare"]["writer_cpu_s"] = wt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--corpus-dir", default=os.path.join(here, "..", "shared", "corpus"))
    p.add_argument("--files", nargs="+", default=["ko.jsonl", "en.jsonl", "code.jsonl"])
    p.add_argument("--tokenizer-model", default=None,
                   help="HCX tokenizer dir (default: train one with --vocab-size on the corpus first)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--spm-tokenizer-model", default=None, help="optional sentencepiece-backend dir to compare")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="encoder timing repeats (best and median shown)")
    p.add_argument("--preprocess-repeats", type=int, default=2)
    p.add_argument("--encode-every", type=int, default=4, help="encoder timings use every N-th document")
    p.add_argument("--output-json", default=None)
    p.add_argument("--megatron-lm", default=os.path.join(REPO, ".peers", "Megatron-LM"),
                   help="checkout of NVIDIA/Megatron-LM (tag core_v0.16.1) whose tools/preprocess_data.py is the peer")
    p.add_argument("--peer-pythonpath", default=os.path.join(REPO, ".peers", "pydeps"),
                   help="extra PYTHONPATH for the peer only (triton, which megatron.training imports)")
    p.add_argument("--replicate", type=int, default=2, help="comparison corpus = the files concatenated N times")
    p.add_argument("--compare-workers", type=int, default=2)
    p.add_argument("--compare-repeats", type=int, default=2)
    p.add_argument("--compare-only", action="store_true", help="only the Megatron-LM comparison")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")

    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess
    from hcx_megatron.tokenizer import load_tokenizer

    paths = [os.path.join(a.corpus_dir, f) for f in a.files]
    work = tempfile.mkdtemp(prefix="bench-preprocess-")
    results = {"cpu_count": os.cpu_count(), "files": paths}
    if a.tokenizer_model is None:
        from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

        a.tokenizer_model = os.path.join(work, "tok")
        t0 = time.perf_counter()
        train_tokenizer(iter(_texts(paths)), a.tokenizer_model, TrainConfig(vocab_size=a.vocab_size))
        results["tokenizer_train_s"] = time.perf_counter() - t0
        print(f"trained tokenizer (vocab {a.vocab_size}) in {results['tokenizer_train_s']:.1f} s")
    tok = load_tokenizer(a.tokenizer_model)
    print(f"tokenizer: {tok}")
    compare_with_megatron_lm(a, paths, work, results)
    if a.compare_only:
        if a.output_json:
            with open(a.output_json, "w") as f:
                json.dump(results, f, indent=2)
        return 0

    # ---------------------------------------------------------------- preprocessing pipeline
    # Runs alternate between worker counts and the best of --preprocess-repeats is kept, so a load spike
    # from other users of a shared machine hits both sides alike.
    print(f"load average before: {os.getloadavg()}")
    best = {}
    for _ in range(a.preprocess_repeats):
        for w in a.workers:
            c0 = _cpu_seconds()
            s = preprocess(PreprocessConfig(inputs=paths, output_prefix=os.path.join(work, f"w{w}"),
                                            tokenizer_model=a.tokenizer_model, append_eod=True, workers=w,
                                            progress=False))
            cpu = _cpu_seconds() - c0
            if w not in best or s.seconds < best[w][0].seconds:
                best[w] = (s, cpu)
    print("\n| pipeline | docs/s | MB/s | tokens/s | speed-up vs 1 worker (wall) | MB per CPU-second |\n"
          "|---|---:|---:|---:|---:|---:|")
    base = None
    results["preprocess"] = {}
    for w in a.workers:
        s, cpu = best[w]
        r = {"docs_per_s": s.docs / s.seconds, "mb_per_s": s.input_bytes / 1e6 / s.seconds,
             "tokens_per_s": s.tokens / s.seconds, "docs": s.docs, "tokens": s.tokens, "seconds": s.seconds,
             "cpu_seconds": cpu, "mb_per_cpu_s": s.input_bytes / 1e6 / cpu}
        base = base or r["mb_per_s"]
        results["preprocess"][w] = r
        print(f"| preprocess_data --workers {w} | {r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['mb_per_s'] / base:.2f}x | {r['mb_per_cpu_s']:.2f} |")

    # ---------------------------------------------------------------- encoder
    from tokenizers import Tokenizer

    texts = _texts(paths)[::a.encode_every]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    plain = Tokenizer.from_file(os.path.join(a.tokenizer_model, "tokenizer.json"))
    assert [e.ids for e in plain.encode_batch(texts[:20], add_special_tokens=False)] == tok.tokenize_batch(texts[:20])
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    cases = [
        ("plain HF tokenizers, encode() per doc (baseline)",
         lambda: [plain.encode(t, add_special_tokens=False).ids for t in texts]),
        ("HCXTokenizer.tokenize() per doc", lambda: [tok.tokenize(t) for t in texts]),
        ("plain HF tokenizers, encode_batch() (all cores)",
         lambda: [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]),
        ("HCXTokenizer.tokenize_batch() (all cores)", lambda: tok.tokenize_batch(texts)),
    ]
    from hcx_megatron.tokenizer.fast_bpe import FastBPEEncoder

    fast_path = os.path.join(a.tokenizer_model, "tokenizer.json")
    assert FastBPEEncoder(fast_path).tokenize_batch(texts[:50]) == tok.tokenize_batch(texts[:50])
    # a fresh encoder per run: each timing includes filling the pre-token memo (as one preprocessing run does)
    cases.append(("hcx fast_bpe FastBPEEncoder.tokenize_batch() (one thread, cold memo)",
                  lambda: FastBPEEncoder(fast_path).tokenize_batch(texts)))
    if a.spm_tokenizer_model:
        spm_tok = load_tokenizer(a.spm_tokenizer_model)
        cases += [("sentencepiece backend, tokenize() per doc", lambda: [spm_tok.tokenize(t) for t in texts]),
                  ("sentencepiece backend, tokenize_batch()", lambda: spm_tok.tokenize_batch(texts))]
    print(f"\nencode {len(texts)} docs, {mb:.2f} MB ({a.repeats} repeats, best / median)")
    print("| encoder | MB/s (best) | MB/s (median) | vs baseline (wall) | MB per CPU-second |\n"
          "|---|---:|---:|---:|---:|")
    results["encode"] = {}
    base = None
    for name, fn in cases:
        best, med, cpu = _best(fn, a.repeats)
        base = base or mb / best
        results["encode"][name] = {"mb_per_s_best": mb / best, "mb_per_s_median": mb / med, "mb_per_cpu_s": mb / cpu}
        print(f"| {name} | {mb / best:.2f} | {mb / med:.2f} | {mb / best / base:.2f}x | {mb / cpu:.2f} |")

    # ---------------------------------------------------------------- analyser
    from hcx_megatron.tokenizer.morpheme import MorphemeSegmenter

    ko = [t for t in texts if any("\uac00" <= c <= "\ud7a3" for c in t[:2000])][:200]
    ko_mb = sum(len(t.encode()) for t in ko) / 1e6
    seg = MorphemeSegmenter()
    seg.boundaries_many(ko[:2])  # model warm-up
    _, _, c_kiwi = _best(lambda: seg.boundaries_many(ko), 1)
    _, _, c_bpe = _best(lambda: [tok.tokenize(t) for t in ko], a.repeats)
    results["korean"] = {"kiwi_mb_per_cpu_s": ko_mb / c_kiwi, "bpe_mb_per_cpu_s": ko_mb / c_bpe}
    print(f"\nKorean text ({len(ko)} docs, {ko_mb:.2f} MB), one thread, per CPU-second: Kiwi analysis "
          f"{ko_mb / c_kiwi:.2f} MB vs byte-level BPE encode {ko_mb / c_bpe:.2f} MB ({c_kiwi / c_bpe:.0f}x slower)")
    print(f"load average after: {os.getloadavg()}  (cpu_count {os.cpu_count()}; other jobs share these cores)")
    results["loadavg_end"] = os.getloadavg()
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
