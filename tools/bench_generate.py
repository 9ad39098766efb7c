#!/usr/bin/env python
"""Generation speed: hcx_megatron's generate() with the KV cache and without it (the old full-prefix path) against
transformers' `generate` (KV cache) on the Hugging Face export of the SAME checkpoint, in one invocation.

Each measurement runs in its own process (1 thread, greedy, no stop id so every side produces exactly
`new` tokens), with the model already loaded and one short warm-up call; only the generate calls are timed, the
best of --repeat (default 3: the machine may be shared), in wall-clock seconds and in the process's CPU time (less
sensitive to other processes taking the cores, though not to their cache/memory traffic). Prompts are random token ids (seeded, identical on every
side) of `prompt` tokens, `batch` of them.

    make demo                                  # writes runs/demo/checkpoints and runs/demo/hf
    python tools/bench_generate.py             # batch 1 and 8; 32+128 and 256+256 tokens
    python tools/bench_generate.py --checkpoint CKPT --hf HF_DIR --cases 1x32+128 --json out.json
    python tools/bench_generate.py --same-process --repeat 5   # both sides alternating in one process (CPU time)
    python tools/bench_generate.py --rollouts 12 64 128 256 --repeat 5   # PPO rollouts: the code issue 13 was filed against vs now

Our side runs with its forwards compiled from the warm-up on (hcx_megatron/inference/compiled.py: a long session
or run compiles them after COMPILE_AFTER_CALLS eager calls); the first call's CPU time, tracing included, is printed.

Prints seconds and generated tokens/s per side, the ratios against transformers, and whether the tokens of the
three sides are equal (greedy decoding of the same weights; a differing token means a near-tie broken
differently by differently ordered float sums, or a bug — the first differing position is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OURS = r"""
import json, sys, time, torch
def main():
    ckpt, prompts, new, kv = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "kv"
    repeat = int(sys.argv[5])
    from hcx_megatron.inference import compiled
    from hcx_megatron.inference.generate import generate
    from hcx_megatron.inference.load import load_for_inference
    compiled.COMPILE_AFTER_CALLS.clear()  # decode steps compiled from the warm-up on, as a long session has them
    model = load_for_inference(ckpt, device="cpu", with_tokenizer=False)
    torch.set_num_threads(1)  # after loading: CPU mode gives each rank cpu_count // ranks threads
    generate(model.chunks, [p[:8] for p in prompts], 2, stop_ids=(), kv_cache=kv)  # warm-up
    seconds, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = generate(model.chunks, prompts, new, stop_ids=(), kv_cache=kv, vocab_size=model.cfg.model.vocab_size)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print("RESULT " + json.dumps({"seconds": min(seconds), "cpu_seconds": min(cpu), "tokens": out.tokens}))
if __name__ == "__main__":
    main()
"""

_TRANSFORMERS = r"""
import json, sys, time, torch
def main():
    torch.set_num_threads(1)
    hf, prompts, new, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **{**kw, "attention_mask": torch.ones_like(ids[:, :8])})
        seconds, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    print("RESULT " + json.dumps({"seconds": min(seconds), "cpu_seconds": min(cpu),
                                  "tokens": out[:, ids.shape[1]:].tolist()}))
if __name__ == "__main__":
    main()
"""


_SAME_PROCESS = r"""
import json, sys, time, torch
def main():
    ckpt, hf_dir, prompts, new, repeat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    from hcx_megatron.inference import compiled
    from hcx_megatron.inference.generate import generate
    from hcx_megatron.inference.load import load_for_inference
    from transformers import LlamaForCausalLM
    compiled.COMPILE_AFTER_CALLS.clear()  # decode steps compiled from the warm-up on, as a long session has them
    model = load_for_inference(ckpt, device="cpu", with_tokenizer=False)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()  # CPU mode is exact for it
    torch.set_num_threads(1)
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    def ours():
        return generate(model.chunks, prompts, new, stop_ids=(), vocab_size=model.cfg.model.vocab_size).tokens
    def theirs():
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)[:, ids.shape[1]:].tolist()
    start = time.process_time()
    ours()  # warm-up; the first call traces the compiled decode step (once per process)
    first_kv = time.process_time() - start
    theirs()
    best, tokens = {}, {}
    for _ in range(repeat):
        for name, f in (("kv", ours), ("hf", theirs)):  # alternating: both sides see the same machine load
            start = time.process_time()
            tokens[name] = f()
            best[name] = min(best.get(name, 1e9), time.process_time() - start)
    print("RESULT " + json.dumps({"kv_cpu_s": best["kv"], "hf_cpu_s": best["hf"], "equal": tokens["kv"] == tokens["hf"],
                                  "first_kv_cpu_s": first_kv}))
if __name__ == "__main__":
    main()
"""


_ROLLOUTS = r"""
import inspect, json, os, random, socket, sys, time, torch
# One side of the rollout comparison: this tree's code ("now", "now-eager") or the code issue 13 was filed against
# ("before": PYTHONPATH points at its `git archive`), on the weights in argv[2] (written by the first side run).
def main():
    side, weights, new_tokens, repeat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import hcx_megatron.inference.generate as gen_module
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed.initialize import initialize_distributed
    from hcx_megatron.model.builder import build_model
    from hcx_megatron.rlhf.common import freeze
    from hcx_megatron.rlhf.rollout import RolloutProducer, RolloutSettings
    # tests/conftest.py ppo_small_vocab's model: hcx-tiny widths, 2 layers, vocabulary 64 (random weights here)
    cfg, _ = parse_config(["--mock-data", "--device", "cpu", "--vocab-size", "64", "--make-vocab-size-divisible-by",
                           "64", "--num-layers", "2", "--seq-length", "32", "--seed", "7"])
    initialize_distributed(cfg)
    torch.set_num_threads(1)
    policy, ref = (build_model(cfg, "cpu", wrap_ddp=False).chunks for _ in range(2))
    cores = {}
    for name, chunks in (("policy", policy), ("ref", ref)):
        cores[name] = chunks[0]
        while hasattr(cores[name], "module"):
            cores[name] = cores[name].module
    if os.path.exists(weights):  # the same weights on every side
        saved = torch.load(weights)
        for name, core in cores.items():
            missing, unexpected = core.load_state_dict(saved[name], strict=False)  # TE's _extra_state may differ
            bad = [k for k in missing + unexpected if not k.endswith("_extra_state")]
            if bad:
                raise SystemExit(f"{side}: the saved {name} weights do not fit this code's model: {bad[:5]}")
    else:
        torch.save({name: core.state_dict() for name, core in cores.items()}, weights)
    freeze(ref)  # as PPO holds its reference
    rng = random.Random(0)
    prompts = [[rng.randrange(63) for _ in range(4)] for _ in range(256)]
    old_api = "ref_chunks" in inspect.signature(RolloutProducer.__init__).parameters  # before issue 13
    if side == "now":  # the steady state of a long run: forwards compiled (after COMPILE_AFTER_CALLS eager calls)
        from hcx_megatron.inference import compiled
        compiled.COMPILE_AFTER_CALLS.clear()
    real_generate, gen_time = gen_module.generate, [0.0]
    def timed_generate(*args, **kwargs):
        start = time.process_time()
        try:
            return real_generate(*args, **kwargs)
        finally:
            gen_time[0] += time.process_time() - start
    gen_module.generate = timed_generate
    def rollout(new):  # sampling, the policy's teacher-forced log-probs and entropy, the reference's log-probs
        s = RolloutSettings(rollout_batch=32, max_new_tokens=new, temperature=1.0, top_p=1.0, stop_ids=(63,),
                            vocab_size=64, pad_id=0, micro_batch=8, seed=1234)
        if old_api:
            ro = RolloutProducer(s, prompts, ref, None, "cpu", 0, 1).produce(0, policy, 0)
            return ro, ro.ref_logp
        from hcx_megatron.rlhf.ppo_models import reference_logprobs, sequences_micro
        ro = RolloutProducer(s, prompts, None, "cpu", 0, 1).produce(0, policy, 0)
        return ro, reference_logprobs(ref, sequences_micro(ro, s.micro_batch), s)
    start = time.process_time()
    rollout(4)  # the first rollout of the process (with "now": the compiled forwards' traces)
    rows = {"first_s": time.process_time() - start, "by_new": {}}
    for new in new_tokens:
        best = gen_best = 1e9
        for _ in range(repeat):
            gen_time[0] = 0.0
            start = time.process_time()
            ro, ref_logp = rollout(new)
            seconds = time.process_time() - start
            if seconds < best:
                best, gen_best = seconds, gen_time[0]
        lengths = ro.response_length.float()
        rows["by_new"][new] = {"seconds": best, "gen_seconds": gen_best, "mean_response": float(lengths.mean()),
                               "max_response": int(lengths.max()), "tokens": ro.tokens.tolist(),
                               "logprobs": [t.tolist() for t in (ro.old_logp, ro.entropy, ref_logp)]}
    print("RESULT " + json.dumps(rows))
if __name__ == "__main__":
    main()
"""


def _run(code: str, args: list[str], tree: str = REPO) -> dict:
    """Run a worker in its own process on the code of `tree` (this checkout, or an archived revision)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# main when issue 13 (KV-cached generation) was filed, i.e. the last commit before its work: the rollouts' baseline.
BEFORE_ISSUE_13 = "5883437"


def archived_tree(rev: str) -> str:
    """This repository's code at `rev` (`git archive`), unpacked once under runs/bench/ (ignored by git)."""
    dest = os.path.join(REPO, "runs", "bench", f"hcx_megatron-{rev}")
    if not os.path.isdir(os.path.join(dest, "hcx_megatron")):
        got = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True)
        if got.returncode != 0:
            raise SystemExit(f"bench_generate: cannot archive revision {rev} of {REPO} (a shallow clone?): "
                             f"{got.stderr.decode().strip()}")
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        subprocess.run(["tar", "-x", "-C", tmp], input=got.stdout, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


_GEMM_PEAK = r"""
import json, sys, time, torch
torch.set_num_threads(1)
best = {}
for m in (32, 544):  # a decode step's rows; a teacher-forced micro-batch's tokens (8 x 68)
    for k, n in ((128, 256), (128, 128), (128, 704), (352, 128), (128, 64)):  # the PPO test model's GEMMs
        x, w = torch.randn(m, k), torch.randn(n, k)
        for _ in range(10):
            x @ w.t()
        start = time.perf_counter()
        for _ in range(100):
            x @ w.t()
        best[f"{m}x{k}x{n}"] = 2 * m * k * n * 100 / (time.perf_counter() - start) / 1e9
print("RESULT " + json.dumps(best))
"""

# GEMM multiply-adds per token-forward of the PPO test model: 2 layers of QKV (128 -> 128 + 2 x 64), projection,
# SwiGLU fc1 (128 -> 2 x 352) and fc2 (352 -> 128), then the 128 x 64 output layer.
_MACS_PER_TOKEN = 2 * (128 * 256 + 128 * 128 + 128 * 704 + 352 * 128) + 128 * 64


def gemm_floor(max_response: int, gflops: float, rows: int = 32, prompt: int = 4) -> tuple[float, float]:
    """(GFLOP, seconds at `gflops`) of the GEMMs a rollout must run if every row runs every step: generation (a
    prefill of the prompts, then max_response - 1 one-token steps) and the policy's and the reference's
    teacher-forced passes over prompt + response + 1 positions."""
    tokens = rows * prompt + (max_response - 1) * rows + 2 * rows * (prompt + max_response + 1)
    flop = 2 * _MACS_PER_TOKEN * tokens / 1e9
    return flop, flop / gflops


def bench_rollouts(new_tokens: list[int], repeat: int, rounds: int) -> list[dict]:
    """Each side in its own process per round, the sides alternating; best CPU time over rounds x repeat."""
    before_tree = archived_tree(BEFORE_ISSUE_13)
    sides = {"before": before_tree, "now": REPO, "now-eager": REPO}
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")  # written by the first side, read by every other
        for _ in range(rounds):
            for side, tree in sides.items():
                got = _run(_ROLLOUTS, [side, weights, json.dumps(new_tokens), str(repeat)], tree)
                mine = best.setdefault(side, {"first_s": got["first_s"], "by_new": {}})
                for new, r in got["by_new"].items():
                    if r["seconds"] < mine["by_new"].get(new, {"seconds": 1e9})["seconds"]:
                        mine["by_new"][new] = r
    rows = []
    for new in map(str, new_tokens):
        b, now, eager = (best[side]["by_new"][new] for side in ("before", "now", "now-eager"))
        rows.append({"new": int(new), "before_s": b["seconds"], "before_gen_s": b["gen_seconds"],
                     "now_s": now["seconds"], "now_gen_s": now["gen_seconds"], "eager_s": eager["seconds"],
                     "speedup": b["seconds"] / now["seconds"], "eager_speedup": b["seconds"] / eager["seconds"],
                     "mean_response": now["mean_response"], "max_response": now["max_response"],
                     "same_tokens": b["tokens"] == now["tokens"] == eager["tokens"],
                     "same_logprobs": b["logprobs"] == now["logprobs"] == eager["logprobs"],
                     "now_first_call_s": best["now"]["first_s"]})
    return rows


def parse_case(text: str) -> tuple[int, int, int]:
    """'8x256+256' -> (batch 8, prompt 256, new 256)."""
    try:
        batch, rest = text.split("x")
        prompt, new = rest.split("+")
        return int(batch), int(prompt), int(new)
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r}: expected BATCHxPROMPT+NEW, e.g. 8x256+256") from None


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for row, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return f"row {row} position {pos}: {s} vs {t}"
    return "equal"


def bench_case(batch: int, prompt: int, new: int, a: argparse.Namespace, vocab: int) -> dict:
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(16, vocab) for _ in range(prompt)] for _ in range(batch)]
    blob = json.dumps(prompts)
    print(f"[bench] batch {batch}, {prompt}+{new}", flush=True)
    kv = _run(_OURS, [a.checkpoint, blob, str(new), "kv", str(a.repeat)])
    old = _run(_OURS, [a.checkpoint, blob, str(new), "old", "1"]) if not a.skip_old else None  # slow: once
    hf = _run(_TRANSFORMERS, [a.hf, blob, str(new), str(a.repeat)])
    tokens = batch * new
    row = {"batch": batch, "prompt": prompt, "new": new, "hf_s": hf["seconds"], "kv_s": kv["seconds"],
           "kv_vs_hf": first_difference(kv["tokens"], hf["tokens"])}
    row.update({"hf_tok_s": tokens / hf["seconds"], "kv_tok_s": tokens / kv["seconds"],
                "kv_ratio": kv["seconds"] / hf["seconds"], "hf_cpu_s": hf["cpu_seconds"], "kv_cpu_s": kv["cpu_seconds"],
                "kv_cpu_ratio": kv["cpu_seconds"] / hf["cpu_seconds"]})
    if old is not None:
        row.update({"old_s": old["seconds"], "old_tok_s": tokens / old["seconds"], "old_ratio": old["seconds"] / hf["seconds"],
                    "kv_vs_old": first_difference(kv["tokens"], old["tokens"])})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join(REPO, "runs", "demo", "checkpoints"))
    p.add_argument("--hf", default=os.path.join(REPO, "runs", "demo", "hf"), help="the HF export of --checkpoint")
    p.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in
                   ("1x32+128", "8x32+128", "1x256+256", "8x256+256")])
    p.add_argument("--skip-old", action="store_true", help="do not time the old full-prefix path (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="time the KV and transformers calls this many times, keep "
                   "the best (the old path is timed once)")
    p.add_argument("--same-process", action="store_true",
                   help="instead: our KV generate and transformers' in ONE process, alternating, best of --repeat "
                        "process CPU times (robust to a loaded machine; CPU mode is exact for transformers)")
    p.add_argument("--json", default=None)
    p.add_argument("--rollouts", type=int, nargs="*", default=None, metavar="NEW_TOKENS",
                   help="instead: PPO rollouts (sampling, the policy's teacher-forced log-probs and entropy, the "
                        "reference's log-probs) on the PPO tests' model, batch 32, 4-token prompts, stop id 63, for "
                        "these max new tokens (default 12 64 128 256), by the code issue 13 was filed against "
                        f"({BEFORE_ISSUE_13}, `git archive`d under runs/bench/) and by this checkout, compiled as a "
                        "long run has it and eager as a short one, on the same weights, each in its own process; "
                        "process CPU time, best of --rounds x --repeat")
    p.add_argument("--rounds", type=int, default=2, help="--rollouts: processes per side, alternating")
    a = p.parse_args(argv)
    if a.rollouts is not None:
        rows = bench_rollouts(a.rollouts or [12, 64, 128, 256], a.repeat, a.rounds)
        peak = _run(_GEMM_PEAK, [])
        lo, hi = min(peak.values()), max(peak.values())
        print(f"single-thread GEMM speed at the model's shapes: {lo:.0f}-{hi:.0f} GFLOP/s")
        for r in rows:
            flop, _ = gemm_floor(r["max_response"], hi)
            print(f"{r['new']} new tokens: the GEMMs alone (every row every step) are {flop:.2f} GFLOP = "
                  f"{flop / hi * 1e3:.1f}-{flop / lo * 1e3:.1f} ms; a 5x speedup allows {r['before_s'] / 5 * 1e3:.1f} ms")
        print(f"first rollout of a compiled process (tracing the decode step and forwards included): "
              f"{rows[0]['now_first_call_s']:.2f} s CPU")
        print(f"\n| max new tokens | responses mean / max | before ({BEFORE_ISSUE_13}) s (generation) | now s "
              "(generation) | speedup | now eager s | speedup eager | tokens | log-probs, entropy, reference log-probs |"
              "\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['new']} | {r['mean_response']:.1f} / {r['max_response']} | {r['before_s']:.4f} "
                  f"({r['before_gen_s']:.4f}) | {r['now_s']:.4f} ({r['now_gen_s']:.4f}) | {r['speedup']:.2f}x | "
                  f"{r['eager_s']:.4f} | {r['eager_speedup']:.2f}x | {'equal' if r['same_tokens'] else 'DIFFER'} | "
                  f"{'bitwise equal' if r['same_logprobs'] else 'DIFFER'} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
    for path, what in ((a.checkpoint, "--checkpoint"), (a.hf, "--hf")):
        if not os.path.exists(path):
            print(f"bench_generate: {what} {path} does not exist; `make demo` writes runs/demo/checkpoints and "
                  "runs/demo/hf", file=sys.stderr)
            return 2
    vocab = json.load(open(os.path.join(a.hf, "config.json")))["vocab_size"]
    if a.same_process:
        print("\n| batch | prompt+new | transformers CPU s | KV CPU s | KV / transformers | tokens | KV first call s |\n"
              "|---|---|---|---|---|---|---|")
        for b, s, n in a.cases:
            rng = random.Random(a.seed)
            prompts = [[rng.randrange(16, vocab) for _ in range(s)] for _ in range(b)]
            r = _run(_SAME_PROCESS, [a.checkpoint, a.hf, json.dumps(prompts), str(n), str(a.repeat)])
            print(f"| {b} | {s}+{n} | {r['hf_cpu_s']:.3f} | {r['kv_cpu_s']:.3f} | {r['kv_cpu_s'] / r['hf_cpu_s']:.2f}x | "
                  f"{'equal' if r['equal'] else 'DIFFER'} | {r['first_kv_cpu_s']:.2f} |", flush=True)
        return 0
    rows = [bench_case(b, s, n, a, vocab) for b, s, n in a.cases]
    print("\n| batch | prompt+new | transformers s | KV s | KV / transformers | KV / transformers, CPU time | old s | "
          "old / transformers | KV tok/s | tokens KV vs transformers | KV vs old |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = (f"{r['old_s']:.2f} | {r['old_ratio']:.2f}x" if "old_s" in r else "- | -")
        print(f"| {r['batch']} | {r['prompt']}+{r['new']} | {r['hf_s']:.2f} | {r['kv_s']:.2f} | {r['kv_ratio']:.2f}x | "
              f"{r['kv_cpu_ratio']:.2f}x ({r['kv_cpu_s']:.2f} / {r['hf_cpu_s']:.2f} s) | {old} | {r['kv_tok_s']:.0f} | {r['kv_vs_hf']} | {r.get('kv_vs_old', '-')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
