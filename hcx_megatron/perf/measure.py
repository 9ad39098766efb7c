"""Measure what a built layer really keeps for backward, to check and calibrate memory.py.

Runs one forward of the project's model (hcx_megatron.model.build_model) under
torch.autograd.graph.saved_tensors_hooks and adds up the distinct storages each transformer layer
saves (weights excluded). Needs an initialised process group / parallel_state (one rank is enough).

    python -m hcx_megatron.perf.measure --model-preset hcx-tiny --seq-length 64 --micro-batch-size 2
    torchrun --nproc-per-node 2 -m hcx_megatron.perf.measure --grid grid.json --out bytes.json   # a TP2 grid
"""

from __future__ import annotations

import argparse
import os
import sys


def _saved_storage_bytes(model, tokens, position_ids, regions) -> list[int]:
    """One forward under saved_tensors_hooks; for each module in `regions`, the bytes of the distinct
    non-parameter storages autograd saves while that module runs."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    per_region: list[dict[int, int]] = [dict() for _ in regions]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in params:
            d = per_region[current[0]]
            d[ptr] = max(d.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    handles = []
    for i, module in enumerate(regions):
        handles.append(module.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, position_ids, None, labels=tokens)
    finally:
        for h in handles:
            h.remove()
    return [sum(d.values()) for d in per_region]


def saved_bytes_per_layer(model, tokens, position_ids) -> list[int]:
    """Bytes of distinct non-parameter storages saved for backward while each decoder layer runs."""
    return _saved_storage_bytes(model, tokens, position_ids, list(model.decoder.layers))


def saved_bytes_in_decoder(model, tokens, position_ids) -> int:
    """Bytes of distinct non-parameter storages saved while the whole decoder block runs (under full
    recompute the per-layer hooks see nothing: each checkpoint saves its layer's input outside the layer)."""
    return _saved_storage_bytes(model, tokens, position_ids, [model.decoder])[0]


WHOLE_DECODER = "--measure-whole-decoder"  # grid entries with this pseudo-flag measure the decoder block


def measure(argv: list[str], whole_decoder: bool = False) -> list[int]:
    """Build the model the driver would for `argv` (CPU; one rank unless launched by torchrun, every rank
    then runs the same forward) and measure each layer on this rank ([the whole decoder] if whole_decoder)."""
    import torch

    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed.initialize import initialize_distributed
    from hcx_megatron.model.builder import build_model, unwrap

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    cfg, _ = parse_config(argv + ["--device", "cpu"], world_size=int(os.environ["WORLD_SIZE"]))
    initialize_distributed(cfg)  # idempotent: a grid of configs with one parallel layout shares it
    torch.manual_seed(0)  # the same tokens on every rank of a TP group
    model = unwrap(build_model(cfg, "cpu", wrap_ddp=False).chunks[0])
    b, s = cfg.training.micro_batch_size, cfg.training.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s))
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    if whole_decoder:
        return [saved_bytes_in_decoder(model, tokens, pos)]
    return saved_bytes_per_layer(model, tokens, pos)


def measure_grid(grid: list[list[str]]) -> list[list[int]]:
    """measure() for each argv of a grid (all with the same parallel layout: one process group)."""
    return [measure([a for a in argv if a != WHOLE_DECODER], whole_decoder=WHOLE_DECODER in argv) for argv in grid]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="all other flags are the driver's (model, --seq-length, --micro-batch-size, ...)")
    p.add_argument("--grid", default=None, help="JSON file: a list of driver argv lists to measure in turn")
    p.add_argument("--out", default=None, help="with --grid: rank 0 writes the per-layer bytes here as JSON")
    a, driver_args = p.parse_known_args(argv)
    if a.grid:
        import json

        with open(a.grid, encoding="utf-8") as f:
            got = measure_grid(json.load(f))
        if int(os.environ.get("RANK", "0")) == 0 and a.out:
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump(got, f)
        return 0
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.perf.layout import Layout, Workload
    from hcx_megatron.perf.memory import layer_activation_bytes

    got = measure(driver_args)
    cfg, _ = parse_config(driver_args + ["--device", "cpu"], world_size=1)
    w = Workload(model=cfg.model, seq_length=cfg.training.seq_length, global_batch_size=cfg.training.global_batch_size,
                 precision="bf16" if cfg.training.bf16 else "fp32")
    pred = layer_activation_bytes(w, Layout(micro_batch_size=cfg.training.micro_batch_size))
    for i, n in enumerate(got):
        print(f"layer {i}: saved {n:,} bytes; memory.py (fused kernels) {pred:,.0f}; ratio {n / pred:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
