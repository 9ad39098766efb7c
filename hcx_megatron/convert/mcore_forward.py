"""Megatron-side reference for conversion checks: load a checkpoint on CPU at a chosen TP (PP 1) with
hcx_megatron's builder + load_checkpoint, and write full-vocabulary logits and greedy continuations.

    python -m hcx_megatron.convert.mcore_forward --load CKPT --prompts prompts.json --out ref.pt
    torchrun --nproc-per-node 2 -m hcx_megatron.convert.mcore_forward --tensor-model-parallel-size 2 ...

prompts.json: a list of token-id lists. The output (rank 0) is a torch file
{"logits": [float32 [s, vocab]], "greedy": [[ids]], "tensor_model_parallel_size": tp}.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=10)
    a = p.parse_args(argv)

    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.convert.dist_reader import DistCheckpointReader
    from hcx_megatron.convert.export import saved_model_config
    from hcx_megatron.distributed.env import resolve_dist_env

    with open(a.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    m = saved_model_config(DistCheckpointReader(a.load))
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = rt.cpu_config(m, tp=a.tensor_model_parallel_size, pp=1, world_size=world)
    rt.init_processes(cfg)
    try:
        chunks = rt.build_chunks(cfg)
        rt.load_into(chunks, a.load)
        logits = [rt.logits(chunks, torch.tensor([q]), m.vocab_size)[0] for q in prompts]
        greedy = [rt.greedy(chunks, q, a.new_tokens, m.vocab_size) for q in prompts]
        if resolve_dist_env().rank == 0:
            torch.save({"logits": logits, "greedy": greedy, "tensor_model_parallel_size": a.tensor_model_parallel_size},
                       a.out)
    finally:
        rt.shutdown_processes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
