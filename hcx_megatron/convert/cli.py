"""`hcx-convert-checkpoint` / `python tools/convert_checkpoint.py`: Megatron torch_dist <-> HF Llama.

    to-hf   --load CKPT_DIR --save HF_DIR [--tokenizer-model DIR] [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
            [--verify] [--verify-report FILE]
    from-hf --load HF_DIR --save CKPT_DIR --target-tensor-parallel-size N --target-pipeline-parallel-size M
            [--target-virtual-pipeline-parallel-size V] [--dtype fp32|bf16] [--make-vocab-size-divisible-by 128]
            [--verify]
    verify  --load CKPT_DIR --hf HF_DIR [--tokenizer-model DIR] [--verify-report FILE]

Exit codes: 0 ok; 1 --verify over tolerance; 2 bad input (message names the file/flag).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hcx-convert-checkpoint", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("to-hf", help="megatron checkpoint (any TP/PP/VPP) -> HF LlamaForCausalLM directory")
    e.add_argument("--load", required=True, help="the pretraining driver's --save dir (latest) or one iter_XXXXXXX")
    e.add_argument("--save", required=True, help="HF output directory (replaced if it exists)")
    e.add_argument("--tokenizer-model", default=None, help="tokenizer dir (tools/train_tokenizer.py) to include")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weight dtype in the HF files (default: the checkpoint's)")
    e.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB, 500MB (default 5GB)")

    i = sub.add_parser("from-hf", help="HF Llama-architecture directory -> megatron checkpoint for --load --finetune")
    i.add_argument("--load", required=True, help="HF model directory (config.json + safetensors)")
    i.add_argument("--save", required=True, help="checkpoint root to write (iter_0000000 + tracker + model.yaml)")
    i.add_argument("--target-tensor-parallel-size", type=int, default=1)
    i.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    i.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=None)
    i.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights in the checkpoint")
    i.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    v = sub.add_parser("verify", help="compare an existing megatron checkpoint with an existing HF directory")
    v.add_argument("--load", required=True, help="megatron checkpoint (--save root or iter_XXXXXXX)")
    v.add_argument("--hf", required=True, help="HF LlamaForCausalLM directory")
    v.add_argument("--tokenizer-model", default=None, help="tokenizer dir for the built-in text prompts")

    for sp in (e, i, v):
        if sp is not v:
            sp.add_argument("--verify", action="store_true",
                            help="load both sides on CPU, compare next-token logits and 10 greedy tokens")
        sp.add_argument("--verify-report", default=None, help="also write the comparison as JSON here")
        sp.add_argument("--verify-prompts", default=None, help="JSON list of token-id lists (default: built-in)")
        sp.add_argument("--quiet", action="store_true")
    return p


def _verify(ckpt: str, hf_dir: str, a, tokenizer_dir: str | None) -> int:
    import json

    from hcx_megatron.convert.verify import verify

    prompts = None
    if a.verify_prompts:
        with open(a.verify_prompts, encoding="utf-8") as f:
            prompts = json.load(f)
    report = verify(ckpt, hf_dir, prompts=prompts, tokenizer_dir=tokenizer_dir)
    print(f"[verify] {len(report.prompts)} prompts | max abs diff {report.max_abs_diff:.3e} | max rel diff "
          f"{report.max_rel_diff:.3e} (tolerance {report.tolerance:.0e}) | greedy tokens "
          f"{'identical' if report.greedy_megatron == report.greedy_hf else 'DIFFER'}", flush=True)
    if a.verify_report:
        with open(a.verify_report, "w", encoding="utf-8") as f:
            f.write(report.to_json())
    if not report.ok:
        print(f"[verify] FAILED: megatron greedy {report.greedy_megatron} vs HF {report.greedy_hf}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="[convert] %(message)s")
    from hcx_megatron.config.args import ConfigError
    from hcx_megatron.convert.hf_config import UnsupportedModelError

    try:
        if a.command == "verify":
            return _verify(a.load, a.hf, a, a.tokenizer_model)
        if a.command == "to-hf":
            from hcx_megatron.convert.export import export_to_hf
            from hcx_megatron.convert.hf_writer import parse_size

            r = export_to_hf(a.load, a.save, tokenizer_dir=a.tokenizer_model, dtype=a.dtype,
                             max_shard_size=parse_size(a.max_shard_size), progress=not a.quiet)
            tok = (f"; tokenizer ({r.tokenizer['vocab_size']} tokens, chat template from "
                   f"{r.tokenizer['chat_template_source']})") if r.tokenizer else ""
            print(f"[convert] wrote {r.out_dir}: {r.num_shards} safetensors shard(s), {r.weight_bytes / 1e6:.1f} MB "
                  f"in {r.seconds:.1f}s{tok}", flush=True)
            if a.verify:
                return _verify(a.load, a.save, a, a.tokenizer_model)
            return 0
        from hcx_megatron.convert.importer import continue_pretraining_command, import_from_hf

        tp, pp = a.target_tensor_parallel_size, a.target_pipeline_parallel_size
        r = import_from_hf(a.load, a.save, tp=tp, pp=pp, vpp=a.target_virtual_pipeline_parallel_size,
                           dtype=a.dtype, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by)
        print(f"[convert] wrote {r.checkpoint_dir} (padded vocab {r.padded_vocab_size} for TP{tp}) and "
              f"{r.model_yaml} in {r.seconds:.1f}s\n[convert] continue pretraining with:\n  "
              f"{continue_pretraining_command(r, tp, pp)}", flush=True)
        if a.verify:
            return _verify(a.save, a.load, a, None)
        return 0
    except (ConfigError, UnsupportedModelError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"hcx-convert-checkpoint {a.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
