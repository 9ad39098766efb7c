"""hcx-plan-layout: rank parallel layouts for a model, global batch, sequence length and GPU count.

    hcx-plan-layout --model-preset hcx-l --num-gpus 64 --seq-length 4096 --global-batch-size 512
    hcx-plan-layout --model-preset hcx-s --num-gpus 32 --layout tp=2,dp=16,mb=2      # one layout, in detail
    hcx-plan-layout ... --calibrate sweeps/s                # fit the knobs to a measured sweep first
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from hcx_megatron.config.model import get_preset, load_model_yaml
from hcx_megatron.perf.calibrate import DEFAULT_FIT
from hcx_megatron.perf.cluster import load_cluster, save_cluster
from hcx_megatron.perf.layout import Workload, parse_layout
from hcx_megatron.perf.planner import SearchSpace, evaluate, format_table, plan


def _recompute_choices(text: str) -> tuple[str | None, ...]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if t not in ("none", "selective", "full"):
            raise argparse.ArgumentTypeError(f"--recompute: {t!r} is not none, selective or full")
        out.append(None if t == "none" else t)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hcx-plan-layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="hcx-s")
    p.add_argument("--model-config", default=None, help="YAML of ModelConfig fields applied on the preset")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (before padding)")
    p.add_argument("--num-gpus", type=int, required=True)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--precision", choices=["bf16", "fp32", "fp8"], default="bf16",
                   help="fp8: bf16 mixed precision with Transformer Engine FP8 linear layers")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise"], default="delayed",
                   help="FP8 scaling: delayed (amax history) or tensorwise (current scaling, one more amax pass)")
    p.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                   help="activation-memory formula: TE fused kernels or megatron-core's local (unfused) spec")
    p.add_argument("--tp-comm-overlap", action="store_true",
                   help="assume TE userbuffers TP communication overlap in every layout (Megatron-LM flag)")
    p.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="gradients kept and reduced in bf16 (NVIDIA's benchmark recipes) instead of fp32")
    p.add_argument("--use-megatron-fsdp", action="store_true", help="also consider Megatron-FSDP layouts")
    p.add_argument("--cluster", default=None, help="cluster YAML (default: DGX H100, examples/clusters/h100.yaml)")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--recompute", type=_recompute_choices, default=(None, "selective", "full"),
                   help="comma list of none,selective,full to consider")
    p.add_argument("--max-vpp", type=int, default=8)
    p.add_argument("--max-cp", type=int, default=8)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--show-unfit", action="store_true", help="list layouts that exceed memory too")
    p.add_argument("--layout", default=None, help="evaluate this one layout (e.g. tp=8,pp=4,vpp=5,dp=2,mb=1)")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="SWEEP_DIR",
                   help="fit the model's knobs to measured sweep(s) before planning")
    p.add_argument("--fit", default=None, help=f"knobs to fit (comma list; default {','.join(DEFAULT_FIT)})")
    p.add_argument("--save-cluster", default=None, help="write the (calibrated) cluster YAML here")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", default=None, help="also write the ranked entries as JSON to this path")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        model = get_preset(a.model_preset)
        if a.model_config:
            model = load_model_yaml(a.model_config, base=model)
        if a.vocab_size:
            model = dataclasses.replace(model, vocab_size=a.vocab_size)
        cluster = load_cluster(a.cluster)
        if a.calibrate:
            from hcx_megatron.perf.calibrate import Measurement, fit
            from hcx_megatron.perf.sweep import collect, load_sweep

            data = []
            for d in a.calibrate:
                sw = load_sweep(d)
                data += [Measurement(sw.workload(r.run), r.run.layout, r.measured.step_time_s, r.run.label)
                         for r in collect(sw, d, cluster) if r.measured is not None]
            knobs = tuple(a.fit.split(",")) if a.fit else DEFAULT_FIT
            res = fit(cluster, data, knobs=knobs)
            cluster = res.cluster
            print(f"calibrated on {len(data)} run(s): "
                  + ", ".join(f"{k}={v:.4g}" for k, v in res.fitted.items())
                  + f"; RMS step-time error {100 * res.rms_rel_error_before:.1f}% -> "
                  f"{100 * res.rms_rel_error_after:.1f}%")
        if a.save_cluster:
            save_cluster(cluster, a.save_cluster)
        w = Workload(model=model, seq_length=a.seq_length, global_batch_size=a.global_batch_size,
                     precision=a.precision, fp8_recipe=a.fp8_recipe, transformer_impl=a.transformer_impl)
        if a.precision == "fp8" and a.transformer_impl == "local":
            raise ValueError("--precision fp8 needs --transformer-impl transformer_engine")
        switches = {}
        if a.tp_comm_overlap:
            switches["tp_comm_overlap"] = True
        if a.grad_reduce_in_bf16:
            switches["grad_reduce_in_fp32"] = False
        if a.layout:
            lay = parse_layout(a.layout)
            lay = dataclasses.replace(lay, **{k: v for k, v in switches.items()
                                              if not (k == "tp_comm_overlap" and lay.tp == 1)})
            if lay.world_size != a.num_gpus:
                raise ValueError(f"--layout {a.layout!r} uses {lay.world_size} GPUs, --num-gpus is {a.num_gpus}")
            problems = lay.check(w)
            if problems:
                raise ValueError(f"--layout {a.layout!r}: {'; '.join(problems)}")
            e = evaluate(w, lay, cluster)
            print(format_table([e], markdown=a.markdown))
            print("memory GiB (worst stage %d): %s" % (e.memory.pp_rank, ", ".join(
                f"{k} {v:.2f}" for k, v in e.memory.as_gib().items())))
            print("step seconds: " + ", ".join(f"{k} {v:.4g}" for k, v in e.time.as_dict().items()))
            return 0 if e.fits else 1
        space = SearchSpace(micro_batch_sizes=tuple(a.micro_batch_sizes), recompute=a.recompute, max_vpp=a.max_vpp,
                            max_cp=a.max_cp, layout_switches=tuple(switches.items()),
                            megatron_fsdp=(False, True) if a.use_megatron_fsdp else (False,))
        entries, n = plan(w, a.num_gpus, cluster, space, include_unfit=a.show_unfit)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hcx-plan-layout: error: {exc}", file=sys.stderr)
        return 2
    n_fit = sum(e.fits for e in entries)
    print(f"{model.name}: {a.num_gpus} GPUs on {cluster.name} ({cluster.gpu}, {cluster.hbm_gib:g} GiB), "
          f"seq {a.seq_length}, global batch {a.global_batch_size}: {n} layouts considered, "
          f"{n_fit if not a.show_unfit else sum(e.fits for e in entries)} fit in "
          f"{cluster.usable_memory_fraction:.0%} of memory")
    if not entries:
        print("no layout fits: add GPUs, allow recompute, or lower the micro-batch size", file=sys.stderr)
        return 1
    print(format_table(entries, a.top, markdown=a.markdown))
    best = entries[0]
    print("best: " + " ".join(best.layout.megatron_flags()))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump([{"layout": e.layout.to_dict(), "fits": e.fits, "memory_gib": e.memory.as_gib(),
                        "time": e.time.as_dict()} for e in entries], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
