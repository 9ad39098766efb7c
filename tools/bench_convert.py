"""Peak memory of the streaming HF export vs checkpoint size, against the non-streaming baseline, same run.

1. writes a torch_dist checkpoint of a Llama-shaped HCX model (random weights, written by
   hcx_megatron.training.checkpoint.save_checkpoint from a 1-process CPU world, as the importer does);
2. in a fresh process: `export_to_hf` (streaming; the method of hcx_megatron.convert) -> peak RSS;
3. in a fresh process: the simple alternative, build the whole model at TP1/PP1 and `load_checkpoint` -> peak RSS;
4. in a fresh process: only the imports both need (the fixed cost) -> RSS.

    python tools/bench_convert.py --work /tmp/bench_convert [--num-layers 24 --hidden-size 2048 ...]

Prints model-weight bytes, each peak, and peak / checkpoint-size ratios (raw and above the import floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WRITE = r"""
import json, sys, torch
def main():
    from hcx_megatron.config.model import ModelConfig
    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.training.checkpoint import save_checkpoint
    m = ModelConfig(**json.loads(sys.argv[1]))
    cfg = rt.cpu_config(m)
    rt.init_processes(cfg)
    chunks = rt.build_chunks(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.normal_(0, 0.02, generator=g)
    save_checkpoint(sys.argv[2], 1, chunks, None, None, cfg.to_dict(), save_optim=False)
    rt.shutdown_processes()
    print("RESULT 0 0 0")
if __name__ == "__main__":
    main()
"""

_EXPORT = r"""
import resource, sys, time
def main():
    from hcx_megatron.convert.export import export_to_hf
    t = time.time()
    r = export_to_hf(sys.argv[1], sys.argv[2], max_shard_size=2 * 10**9, progress=False)
    print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time() - t, r.num_shards)
if __name__ == "__main__":
    main()
"""

_FULL_LOAD = r"""
import resource, sys, time
def main():
    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.convert.dist_reader import DistCheckpointReader
    from hcx_megatron.convert.export import saved_model_config
    t = time.time()
    m = saved_model_config(DistCheckpointReader(sys.argv[1]))
    cfg = rt.cpu_config(m)
    rt.init_processes(cfg)
    chunks = rt.build_chunks(cfg)
    rt.load_into(chunks, sys.argv[1])
    rt.shutdown_processes()
    print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time() - t, 0)
if __name__ == "__main__":
    main()
"""

_IMPORTS = r"""
import resource
def main():
    from hcx_megatron.convert import mcore_runtime, export  # noqa: F401
    from hcx_megatron.convert.dist_reader import DistCheckpointReader  # noqa: F401
    print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0, 0)
if __name__ == "__main__":
    main()
"""


def _run(script: str, work: str, name: str, *args: str) -> tuple[int, float]:
    path = os.path.join(work, f"_{name}.py")
    with open(path, "w") as f:
        f.write(script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, path, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    return int(line[1]), float(line[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_convert")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and HF output")
    p.add_argument("--reuse", action="store_true", help="reuse a checkpoint a previous --keep run left in --work")
    a = p.parse_args(argv)

    from hcx_megatron.config.model import ModelConfig, count_parameters

    m = ModelConfig(name="bench", num_layers=a.num_layers, hidden_size=a.hidden_size,
                    ffn_hidden_size=a.ffn_hidden_size, num_attention_heads=a.num_attention_heads,
                    num_query_groups=a.num_query_groups, vocab_size=a.vocab_size, max_position_embeddings=4096)
    os.makedirs(a.work, exist_ok=True)
    ckpt, hf = os.path.join(a.work, "ckpt"), os.path.join(a.work, "hf")
    if not a.reuse:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"model: {count_parameters(m) / 1e9:.2f}B parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
          f"ffn {m.ffn_hidden_size}, {m.num_attention_heads} heads / {m.num_query_groups} groups, "
          f"vocab {m.vocab_size})",
          flush=True)
    t = time.time()
    from dataclasses import asdict

    if not a.reuse:
        _run(_WRITE, a.work, "write", json.dumps(asdict(m)), ckpt)
        print(f"wrote checkpoint in {time.time() - t:.0f}s", flush=True)
    from hcx_megatron.convert.dist_reader import DistCheckpointReader

    size = DistCheckpointReader(ckpt).model_bytes()
    floor, _ = _run(_IMPORTS, a.work, "imports")
    stream, t_stream = _run(_EXPORT, a.work, "export", ckpt, hf)
    full, t_full = _run(_FULL_LOAD, a.work, "full_load", ckpt)
    gb = 1e9
    print(f"checkpoint model weights: {size / gb:.2f} GB (fp32)")
    print(f"import floor (torch + megatron + hcx_megatron imported): {floor / gb:.2f} GB")
    print(f"{'method':44s} {'peak RSS GB':>12s} {'peak/ckpt':>10s} {'(peak-floor)/ckpt':>18s} {'time s':>8s}")
    for name, peak, secs in (("streaming export (hcx_megatron.convert)", stream, t_stream),
                             ("baseline: build TP1 model + load_checkpoint", full, t_full)):
        print(f"{name:44s} {peak / gb:12.2f} {peak / size:10.3f} {(peak - floor) / size:18.3f} {secs:8.1f}")
    if not a.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
