"""`--verify`: load the megatron checkpoint (CPU, hcx_megatron's builder + load_checkpoint) and the HF directory
(transformers.LlamaForCausalLM), compare next-token logits on a few prompts, and greedy continuations."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

# fp32 on CPU: the two implementations differ only in operation order (SDPA vs eager attention, fused
# rms_norm vs HF's). Measured differences are ~1e-6 relative; bf16/fp16 exports are compared after casting
# the megatron weights the same way, so the tolerance scales with the export dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


@dataclass
class VerifyReport:
    prompts: list[list[int]]
    max_abs_diff: float
    max_rel_diff: float  # max |a - b| / max |a| over each prompt's last-position logits
    tolerance: float
    greedy_megatron: list[list[int]] = field(default_factory=list)
    greedy_hf: list[list[int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance and self.greedy_megatron == self.greedy_hf

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def default_prompts(vocab_size: int, tokenizer_dir: str | None = None, n: int = 3, length: int = 12) -> list[list[int]]:
    if tokenizer_dir:
        from hcx_megatron.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        texts = ["안녕하세요, 오늘 날씨는", "The capital of France is", "def fibonacci(n):\n    "]
        return [tok.tokenize(t) for t in texts[:n]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def hf_logits_and_greedy(hf_dir: str, prompts: list[list[int]], new_tokens: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    logits, gen = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0].float())
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            gen.append(out[0, len(p):].tolist())
    return logits, gen


def verify(ckpt: str, hf_dir: str, prompts: list[list[int]] | None = None, tokenizer_dir: str | None = None,
           new_tokens: int = 10) -> VerifyReport:
    """Runs megatron (1-rank gloo world, CPU mode) and HF in THIS process; call from a CLI process."""
    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.convert.dist_reader import DistCheckpointReader
    from hcx_megatron.convert.export import saved_model_config

    with open(f"{hf_dir}/config.json", encoding="utf-8") as f:
        hf_dtype = json.load(f).get("torch_dtype", "float32")
    m = saved_model_config(DistCheckpointReader(ckpt))
    prompts = prompts or default_prompts(m.vocab_size, tokenizer_dir)
    cfg = rt.cpu_config(m)
    rt.init_processes(cfg)
    try:
        chunks = rt.build_chunks(cfg)
        rt.load_into(chunks, ckpt)
        if hf_dtype in ("bfloat16", "float16"):
            # Compare like with like: the HF weights were rounded to this dtype by the export.
            dt = getattr(torch, hf_dtype)
            with torch.no_grad():
                for p in chunks[0].parameters():
                    p.copy_(p.to(dt).float())
        mc_logits = [rt.logits(chunks, torch.tensor([p]), m.vocab_size)[0] for p in prompts]
        mc_gen = [rt.greedy(chunks, p, new_tokens, m.vocab_size) for p in prompts]
        hf_logits, hf_gen = hf_logits_and_greedy(hf_dir, prompts, new_tokens)  # CPU mode leaves transformers exact
    finally:
        rt.shutdown_processes()
    max_abs = max_rel = 0.0
    for a, b in zip(mc_logits, hf_logits):
        diff = (a - b).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(a.abs().max().item(), 1e-12))
    return VerifyReport(prompts, max_abs, max_rel, TOLERANCE.get(hf_dtype, 1e-4), mc_gen, hf_gen)
