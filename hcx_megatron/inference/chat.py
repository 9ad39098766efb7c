"""`hcx-chat`: a quick chat with a checkpoint (pretrain or SFT) in the HCX chat format.

    hcx-chat --load runs/sft/ckpt --device cpu                       # interactive; /reset, /exit
    hcx-chat --load runs/sft/ckpt --prompt "Hi" --prompt "And then?"  # scripted turns, one conversation
    torchrun --nproc-per-node 2 -m hcx_megatron.inference.chat --load CKPT --tensor-model-parallel-size 2 ...

Under torchrun/Slurm every rank runs the model; rank 0 reads stdin and prints, and broadcasts each user line
so all ranks generate together. Generation decodes with megatron-core's KV cache
(hcx_megatron/inference/kv_generate.py); --no-generation-kv-cache re-runs the whole prefix per token instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from hcx_megatron.inference.generate import add_generation_args

    p = argparse.ArgumentParser(description="Chat with an hcx_megatron checkpoint", allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint root (uses its latest) or an iter_XXXXXXX directory")
    p.add_argument("--tokenizer-model", default=None, help="default: the tokenizer the checkpoint was trained with")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--system", default=None, help="system message opening the conversation")
    p.add_argument("--prompt", action="append", default=None,
                   help="a user turn (repeatable); answers them in order and exits instead of reading stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print each answer as a JSON line (for scripts)")
    add_generation_args(p)
    return p


def _broadcast_line(line: str | None) -> str | None:
    import torch.distributed as dist

    box = [line]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def chat_turns(model, user_lines, system: str | None, args, emit) -> list[dict]:
    """Run a conversation: for each user line generate the assistant turn. `user_lines` yields str (or None to
    stop, "/reset" to start over). Returns the final conversation."""
    from hcx_megatron.data.chat import generation_stop_and_pad_ids, prompt_ids, response_text
    from hcx_megatron.inference.generate import generate

    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    for line in user_lines:
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(base)
            emit({"event": "reset"})
            continue
        messages.append({"role": "user", "content": line})
        ids = prompt_ids(model.tokenizer, messages)
        limit = model.cfg.model.max_position_embeddings
        if len(ids) >= limit:
            emit({"event": "error", "error": f"conversation is {len(ids)} tokens, the model's limit is {limit}; /reset"})
            messages.pop()
            continue
        stop_ids, pad_id = generation_stop_and_pad_ids(model.tokenizer)
        out = generate(model.chunks, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed + len(messages), vocab_size=model.tokenizer.vocab_size, max_seq_length=limit,
                       kv_cache=args.generation_kv_cache, stop_ids=stop_ids, pad_id=pad_id)
        answer = response_text(model.tokenizer, out.tokens[0])
        messages.append({"role": "assistant", "content": answer})
        emit({"event": "answer", "user": line, "assistant": answer, "tokens": len(out.tokens[0]),
              "finished": out.finished[0]})
    return messages


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from hcx_megatron.distributed.initialize import shutdown
    from hcx_megatron.inference.load import load_for_inference

    model = load_for_inference(args.load, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                               args.device, args.tokenizer_model)
    rank0 = dist.get_rank() == 0

    def emit(event: dict) -> None:
        if not rank0:
            return
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
        elif event["event"] == "answer":
            print(f"assistant> {event['assistant']}" + ("" if event["finished"] else "  [cut at --max-new-tokens]"),
                  flush=True)
        elif event["event"] == "reset":
            print("(conversation reset)", flush=True)
        elif event["event"] == "error":
            print(f"error: {event['error']}", flush=True)

    def lines():
        if args.prompt is not None:
            for p in args.prompt:
                yield p
            return
        while True:
            line = None
            if rank0:
                try:
                    line = input("user> ")
                except EOFError:
                    line = None
            line = _broadcast_line(line)
            if line is None:
                return
            yield line

    try:
        chat_turns(model, lines(), args.system, args, emit)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":  # the dist-checkpoint reader may spawn processes: keep this guard
    sys.exit(main())
