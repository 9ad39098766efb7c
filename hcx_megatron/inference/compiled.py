"""Model forwards as dynamo-captured graphs: `torch.compile(backend="eager", dynamic=True)` traces megatron-core's
modules into one FX graph of the same torch ops, run without their per-module Python (hooks, __call__, bookkeeping).
No kernel changes, so outputs are bitwise those of the eager forward (tests/test_generate.py); the batch and
sequence sizes are symbolic, so a forward is traced once per model (its structure, which parameters need grad) and
process, 1-4 s CPU on the demo and PPO test models, not per shape. Used by the KV-cached decode steps
(kv_generate.py: 15-30% of a tiny model's step saved) and the teacher-forced no-grad passes
(hcx_megatron/rlhf/rollout.py forward_collect: 5-10%, those are GEMM-bound).

Where: `compiled_forward_unsupported_reason` (CPU, TP1 x PP1, the main thread). When: a forward runs eagerly for
its first COMPILE_AFTER_CALLS[its name] calls in a process and compiled from then on, so short runs (tests, a chat
reply) never pay the trace; the numbers are break-evens measured on the PPO test model (docs/benchmarks.md). If
tracing fails the forward runs eagerly from then on (one notice).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch
from megatron.core import parallel_state as ps

from hcx_megatron.distributed import cpu_mode
from hcx_megatron.model.builder import unwrap


def compiled_forward_unsupported_reason(chunks: Sequence[torch.nn.Module]) -> str | None:
    """Why forwards of these chunks run eagerly instead of as dynamo-captured graphs, or None."""
    if threading.current_thread() is not threading.main_thread():
        # prepare_torch_compile lifts CPU mode's patches for a moment (async rollouts run next to training steps)
        return "not on the main thread"
    if next(unwrap(chunks[0]).parameters()).device.type != "cpu":
        return "measured and tested on CPU only"
    if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        return "TP or PP > 1 (collectives and pipeline sends are not traced)"
    return None


# Eager calls of a forward (by its function's name) before it is compiled: about the break-even, trace cost / CPU
# saved per call, measured on the PPO test model (docs/benchmarks.md, session 7): a KV decode step saves 0.15-0.26 ms
# for a 1.7-1.8 s trace (6500-12000 steps), a teacher-forced [8, 17-250] forward 0.12-2.4 ms (noisy) for 1.2-2.3 s
# (500-19000). Compiling at the break-even costs at most about twice the best choice made knowing the run's length
# in advance; short runs (tests, a chat session, PPO smoke runs) stay eager. Names not listed compile at once.
COMPILE_AFTER_CALLS: dict[str, int] = {"decode_forward": 10_000, "teacher_forced_forward": 5_000}

_graphs: dict[Callable, Callable] = {}  # forward -> its torch.compile wrapper (made at first use: CPU mode first)
_eager_calls: dict[Callable, int] = {}
_failures: dict[Callable, str] = {}  # forward -> its first tracing error; it runs eagerly from then on


def run_forward(forward: Callable, *args, compiled: bool):
    """forward(*args); where `compiled` (the caller checked compiled_forward_unsupported_reason), as its captured
    graph once it has run COMPILE_AFTER_CALLS eager calls. Each forward function is compiled on its own (its own
    graphs and dynamo recompile budget)."""
    if compiled and forward not in _failures:
        calls = _eager_calls.get(forward, 0)
        if calls >= COMPILE_AFTER_CALLS.get(forward.__name__, 0):
            cpu_mode.prepare_torch_compile()  # cheap once built
            if forward not in _graphs:
                _graphs[forward] = torch.compile(forward, backend="eager", dynamic=True)
            try:
                return _graphs[forward](*args)
            except Exception as error:  # a layout dynamo cannot trace: the eager forward computes the same
                _failures[forward] = f"{type(error).__name__}: {error}"[:300]
                print(f"[hcx] compiled {forward.__name__} failed, running it eagerly ({_failures[forward]})",
                      flush=True)
        else:
            _eager_calls[forward] = calls + 1
    return forward(*args)


__all__ = ["compiled_forward_unsupported_reason", "run_forward", "COMPILE_AFTER_CALLS"]
