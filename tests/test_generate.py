"""Generation: sampling primitives (pure); the KV-cached path (megatron-core's static inference context) against
the full-prefix reference path in this process (TP1: greedy, sampled, stop ids, length limits, prompts of different
lengths, attention of a decode step over the whole cache); and the same tokens / log-probs from both paths under
TP2, TP2+SP, PP2, TP2xPP2 (with and without SP) and PP2xVPP2 as under TP1 (one four-process torchrun world on gloo).

Run as a script, this file is the worker: it builds a randomly initialised tiny model under each layout
(initialisation is layout-independent, so every layout holds the same weights) and generates."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40], [41, 42]]


@pytest.mark.timeout(60)
def test_top_p_keeps_the_smallest_nucleus():
    from hcx_megatron.inference.generate import top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert kept(1e-6) == [True, False, False, False]  # always at least the most likely token
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.6))[0].tolist() == [False, True, False, True]


@pytest.mark.timeout(60)
def test_choose_next_greedy_and_seeded_sampling():
    from hcx_megatron.inference.generate import choose_next

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    u = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(choose_next(logits, 0.0, 1.0, None), logits.argmax(-1))
    assert torch.equal(choose_next(logits, 1.0, 1e-6, u), logits.argmax(-1))
    a = choose_next(logits, 0.8, 0.9, u)
    # Padded vocabulary columns (probability 0) do not change the draw: layouts with different padding agree.
    padded = torch.cat([logits, torch.full((3, 14), float("-inf"))], dim=-1)
    assert torch.equal(a, choose_next(padded, 0.8, 0.9, u))
    # Frequencies follow softmax(logits / T).
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose_next(row, 0.5, 1.0, torch.rand(1, generator=g, dtype=torch.float64))[0]] += 1
    expected = torch.softmax(row[0] / 0.5, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.03), (counts / 4000, expected)


@pytest.mark.timeout(60)
def test_prompt_uniforms_drawn_ahead_equal_one_by_one_draws():
    """On CPU the draws come a block at a time; each prompt's k-th token must still get its generator's k-th
    number, as drawn one by one (the stream a prompt's samples were always made from), whatever the others do."""
    from hcx_megatron.inference.generate import PromptUniforms, _prompt_generator

    keys, seed = [3, 0, 17], 99
    ahead = PromptUniforms(seed, keys, torch.device("cpu"))
    assert ahead.ahead
    one_by_one = [_prompt_generator(seed, k, torch.device("cpu")) for k in keys]
    counts = [0, 0, 0]
    for step in range(3 * PromptUniforms.BLOCK + 5):
        rows = [r for r in range(3) if r != 1 or step < 10]  # prompt 1 stops early; prompt 2 skips steps
        rows = [r for r in rows if r != 2 or step % 3]
        got = ahead.take(rows, [counts[r] for r in rows])
        want = torch.stack([torch.rand((), generator=one_by_one[r], dtype=torch.float64) for r in rows])
        assert torch.equal(got, want), step
        for r in rows:
            counts[r] += 1


# -- in this process (TP1) ------------------------------------------------------------------------------------
KV_TOLERANCE = 1e-5  # log-probs, KV vs full prefix, fp32: the cached matmuls have other shapes


@pytest.fixture(scope="module")
def tiny_model():
    """A randomly initialised fp32 tiny model on a one-rank gloo world in this process (CPU mode)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # megatron's models are imported before CPU mode patches torch, as in a run.
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed import cpu_mode
    from hcx_megatron.distributed.initialize import set_random_seed
    from hcx_megatron.model.builder import build_model

    if dist.is_initialized():
        pytest.fail("a process group already exists in this process")
    cfg, _ = parse_config(["--mock-data", "--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
                           "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
                           "--vocab-size", "300", "--seed", "7", "--max-position-embeddings", "64",
                           "--seq-length", "64"])
    was_active = cpu_mode.is_active()
    cpu_mode.activate()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    set_random_seed(7)
    try:
        yield build_model(cfg, "cpu", wrap_ddp=False).chunks
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        if not was_active:
            cpu_mode.deactivate()


def _count_kv_steps(monkeypatch, dim: int = 1) -> list:
    """Record tokens.shape[dim] of every KV-cached forward step: the token count (dim 1; proves the KV path ran,
    and how) or the rows run (dim 0)."""
    from hcx_megatron.inference import kv_generate

    steps = []
    real = kv_generate._step_logits

    def counting(chunks, context, tokens, n_micro, mbs, **kwargs):
        steps.append(tokens.shape[dim])
        return real(chunks, context, tokens, n_micro, mbs, **kwargs)

    monkeypatch.setattr(kv_generate, "_step_logits", counting)
    return steps


def _assert_same(full, kv, logprobs: bool = True):
    assert kv.tokens == full.tokens
    assert kv.finished == full.finished
    if logprobs:
        for a, b in zip(full.logprobs, kv.logprobs):
            assert len(a) == len(b)
            assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) < KV_TOLERANCE


# Lengths 1..20: rows start generating at different steps (the longer ones are fed their prompt meanwhile).
MIXED_PROMPTS = PROMPTS + [list(range(100, 120)), [7] * 5]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_p=0.9, seed=5),
                                      dict(temperature=0.7, top_p=1.0, seed=11)], ids=["greedy", "t1_p09", "t07"])
def test_kv_cache_matches_full_prefix_path(tiny_model, monkeypatch, sampling):
    from hcx_megatron.inference.generate import generate

    kw = dict(vocab_size=300, return_logprobs=True, **sampling)
    full = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[], kv_cache=False, **kw)
    steps = _count_kv_steps(monkeypatch)
    kv = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[], **kw)  # kv_cache=True is the default
    _assert_same(full, kv)
    assert all(len(t) == 10 for t in kv.tokens) and not any(kv.finished)
    # One prefill over the shortest prompt, then one token per step until the longest prompt has 10 new tokens.
    shortest, longest = min(map(len, MIXED_PROMPTS)), max(map(len, MIXED_PROMPTS))
    assert steps == [shortest] + [1] * (longest + 10 - 1 - shortest)

    # Stop ids (a token some rows produce early), and a length limit that cuts rows at different points.
    stop_id = full.tokens[0][2]
    full = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[stop_id, 299], kv_cache=False, **kw)
    kv = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[stop_id, 299], kv_cache=True, **kw)
    _assert_same(full, kv)
    assert kv.finished[0] and len(kv.tokens[0]) <= 3
    full = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[], max_seq_length=24, kv_cache=False, **kw)
    kv = generate(tiny_model, MIXED_PROMPTS, 10, stop_ids=[], max_seq_length=24, kv_cache=True, **kw)
    _assert_same(full, kv)
    assert [len(t) for t in kv.tokens] == [min(10, 24 - len(p)) for p in MIXED_PROMPTS]
    # max_new_tokens cuts the KV path exactly where it cuts the reference.
    _assert_same(generate(tiny_model, MIXED_PROMPTS, 3, stop_ids=[], kv_cache=False, **kw),
                 generate(tiny_model, MIXED_PROMPTS, 3, stop_ids=[], kv_cache=True, **kw))
    empty = generate(tiny_model, MIXED_PROMPTS, 0, **kw)
    assert empty.tokens == [[]] * len(MIXED_PROMPTS) and not any(empty.finished)


@pytest.mark.timeout(120)
def test_kv_samples_do_not_depend_on_the_batch(tiny_model):
    from hcx_megatron.inference.generate import generate

    kw = dict(temperature=1.0, top_p=0.95, seed=3, stop_ids=[], vocab_size=300)
    together = generate(tiny_model, MIXED_PROMPTS, 6, **kw).tokens
    alone = [generate(tiny_model, [p], 6, seed_indices=[i], **kw).tokens[0] for i, p in enumerate(MIXED_PROMPTS)]
    assert alone == together


@pytest.mark.timeout(120)
def test_decode_step_attends_to_the_whole_cache(tiny_model):
    """Two prompts that differ ONLY in their first token, generated next to a one-token prompt: their tokens are
    fed one per step through the cache, so every log-prob they get depends on key 0 through cached decode steps."""
    from hcx_megatron.inference.generate import generate

    common = list(range(30, 45))
    prompts = [[5], [1] + common, [2] + common]
    kw = dict(stop_ids=[], vocab_size=300, return_logprobs=True)
    kv = generate(tiny_model, prompts, 4, kv_cache=True, **kw)
    full = generate(tiny_model, prompts, 4, kv_cache=False, **kw)
    _assert_same(full, kv)
    # The first token reaches the answer (a decode step that missed key 0 could not tell the two apart).
    assert abs(kv.logprobs[1][0] - kv.logprobs[2][0]) > 1e-4 or kv.tokens[1][0] != kv.tokens[2][0]


@pytest.mark.timeout(120)
def test_kv_cache_holds_rotated_keys_bitwise_as_megatrons_cache(tiny_model, monkeypatch):
    """The local spec's attention applies RoPE to each step's own positions before megatron caches the keys
    (megatron-core re-rotates the whole cache every step): the same tokens and bitwise the same log-probs as
    megatron's own SelfAttention, and after the prefill RoPE never touches more than the step's one position."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.attention import SelfAttention

    from hcx_megatron.inference.generate import generate
    from hcx_megatron.model.spec import RotatedKeyCacheSelfAttention

    layer = tiny_model[0].decoder.layers[0]
    assert isinstance(layer.self_attention, RotatedKeyCacheSelfAttention)
    rotated_lengths = []
    real_rope = rope_utils._apply_rotary_pos_emb_bshd

    def spy(t, freqs, *args, **kwargs):
        rotated_lengths.append(t.shape[0])
        return real_rope(t, freqs, *args, **kwargs)

    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", spy)
    # Eager steps: the spy counts calls (the compiled step is bitwise the eager one, its own test below).
    kw = dict(stop_ids=[], vocab_size=300, return_logprobs=True, temperature=1.0, top_p=0.9, seed=2,
              compile_decode=False)
    ours = generate(tiny_model, MIXED_PROMPTS, 6, **kw)
    shortest, n_layers = min(map(len, MIXED_PROMPTS)), len(tiny_model[0].decoder.layers)
    assert rotated_lengths[:n_layers] == [shortest] * n_layers  # prefill: queries and keys, one call per layer
    assert set(rotated_lengths[n_layers:]) == {1}  # every later step: its own position only

    rotated_lengths.clear()
    monkeypatch.setattr(RotatedKeyCacheSelfAttention, "_adjust_key_value_for_inference",
                        SelfAttention._adjust_key_value_for_inference)
    megatrons = generate(tiny_model, MIXED_PROMPTS, 6, **kw)
    assert max(rotated_lengths) > 1  # megatron's cache: the whole key cache is rotated at every step
    assert ours.tokens == megatrons.tokens and ours.logprobs == megatrons.logprobs


@pytest.mark.timeout(120)
def test_no_grad_linears_skip_megatrons_autograd_functions_bitwise(tiny_model, monkeypatch):
    """Without autograd, the local spec's linears run the matmul directly instead of megatron's linear Function:
    generation calls megatron's Function only for the output layer (once per step), and gives the same tokens and
    bitwise the same log-probs as megatron's own ColumnParallelLinear/RowParallelLinear forward; with autograd on
    they are megatron's (its Function in the graph)."""
    from megatron.core.tensor_parallel import layers

    from hcx_megatron.inference.generate import generate
    from hcx_megatron.model.spec import NoGradColumnParallelLinear, NoGradRowParallelLinear

    layer = tiny_model[0].decoder.layers[0]
    assert type(layer.self_attention.linear_qkv) is NoGradColumnParallelLinear
    assert type(layer.mlp.linear_fc1) is NoGradColumnParallelLinear
    assert type(layer.self_attention.linear_proj) is NoGradRowParallelLinear
    assert type(layer.mlp.linear_fc2) is NoGradRowParallelLinear
    function_calls = []
    for name in ("linear_with_grad_accumulation_and_async_allreduce", "linear_with_frozen_weight"):
        real = getattr(layers, name)
        spy = functools.wraps(real)(lambda *a, _real=real, **k: function_calls.append(1) or _real(*a, **k))
        spy.warned = True  # megatron's function reads its own `.warned` through the module name
        monkeypatch.setattr(layers, name, spy)
    steps = _count_kv_steps(monkeypatch)
    kw = dict(stop_ids=[], vocab_size=300, return_logprobs=True, temperature=1.0, top_p=0.9, seed=4,
              compile_decode=False)  # eager steps: the spies count calls
    direct = generate(tiny_model, MIXED_PROMPTS, 6, **kw)
    assert len(steps) > 1 and len(function_calls) == len(steps)  # the output layer only

    function_calls.clear()
    steps.clear()
    monkeypatch.setattr(NoGradColumnParallelLinear, "forward", layers.ColumnParallelLinear.forward)
    monkeypatch.setattr(NoGradRowParallelLinear, "forward", layers.RowParallelLinear.forward)
    megatrons = generate(tiny_model, MIXED_PROMPTS, 6, **kw)
    n_layers = len(tiny_model[0].decoder.layers)
    assert len(function_calls) == len(steps) * (1 + 4 * n_layers)
    assert direct.tokens == megatrons.tokens and direct.logprobs == megatrons.logprobs
    monkeypatch.undo()

    x, y = torch.randn(3, 2, layer.mlp.linear_fc1.input_size), torch.randn(3, 2, layer.mlp.linear_fc2.input_size)
    with torch.no_grad():
        fc1_direct, fc2_direct = layer.mlp.linear_fc1(x)[0], layer.mlp.linear_fc2(y)[0]
    fc1, fc2 = layer.mlp.linear_fc1(x)[0], layer.mlp.linear_fc2(y)[0]
    assert "LinearWithGradAccumulation" in type(fc1.grad_fn).__name__  # training: megatron's Function
    assert torch.equal(fc1, fc1_direct) and torch.equal(fc2, fc2_direct)


@pytest.mark.timeout(120)
def test_decode_steps_run_in_inference_mode_without_leaking_inference_tensors(tiny_model, monkeypatch):
    """One-token steps run under torch.inference_mode (cheaper per op); the prefill does not, so what megatron
    caches across calls (the RoPE embedding of the cache length, in an lru_cache) stays a normal tensor: a later
    training step of that length reuses it, and autograd refuses to save inference tensors (TE's fused RoPE would)."""
    from hcx_megatron.inference import kv_generate
    from hcx_megatron.inference.generate import generate

    modes = []
    real = kv_generate._step_logits

    def recording(chunks, context, tokens, n_micro, mbs, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return real(chunks, context, tokens, n_micro, mbs, **kwargs)

    monkeypatch.setattr(kv_generate, "_step_logits", recording)
    prompts, new = [[3, 4, 5, 6, 7, 8, 9]], 5
    generate(tiny_model, prompts, new, stop_ids=[], vocab_size=300)
    assert modes == [False] + [True] * (new - 1)
    cache_length = len(prompts[0]) + new
    assert not tiny_model[0].rotary_pos_emb(cache_length).is_inference()


@pytest.fixture
def compiled_calls(monkeypatch) -> list:
    """Forwards compile at their first call (no eager calls first: COMPILE_AFTER_CALLS emptied), in fresh
    per-test state; returns the names of the forwards run as captured graphs, one entry per call."""
    from hcx_megatron.inference import compiled

    calls = []
    real_compile = torch.compile

    def counting_compile(forward, **options):
        graph = real_compile(forward, **options)  # same code object: dynamo's cache is shared with earlier tests
        return lambda *args: calls.append(forward.__name__) or graph(*args)

    monkeypatch.setattr(compiled, "COMPILE_AFTER_CALLS", {})
    monkeypatch.setattr(compiled, "_graphs", {})
    monkeypatch.setattr(compiled, "_eager_calls", {})
    monkeypatch.setattr(compiled, "_failures", {})
    monkeypatch.setattr(torch, "compile", counting_compile)
    yield calls
    assert not compiled._failures, compiled._failures


def _unique_graphs() -> int:
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.timeout(180)
def test_compiled_decode_step_is_bitwise_the_eager_step(tiny_model, compiled_calls):
    """The one-token steps as one dynamo-captured graph (torch.compile, backend "eager", under CPU mode): the same
    tokens and bitwise the same log-probs as the eager step, greedy and sampled; traced once, not per step or per
    call; weights changed in place after the capture (a PPO update) are the ones used."""
    from hcx_megatron.inference.compiled import compiled_forward_unsupported_reason
    from hcx_megatron.inference.generate import generate

    assert compiled_forward_unsupported_reason(tiny_model) is None
    calls = compiled_calls

    def both(prompts, new, **kw):
        kw.update(stop_ids=[], vocab_size=300, return_logprobs=True)
        eager = generate(tiny_model, prompts, new, compile_decode=False, **kw)
        assert not calls
        compiled = generate(tiny_model, prompts, new, **kw)  # compile_decode=True is the default
        assert len(calls) >= new - 1 and set(calls) == {"decode_forward"}, calls
        calls.clear()
        assert compiled.tokens == eager.tokens and compiled.logprobs == eager.logprobs
        return compiled

    both(MIXED_PROMPTS, 8)
    graphs = _unique_graphs()
    before = both(MIXED_PROMPTS, 8, temperature=1.0, top_p=0.9, seed=5)
    both([list(range(3, 20 + i)) for i in range(len(MIXED_PROMPTS))], 12)  # other offsets and cache length
    assert _unique_graphs() == graphs  # no re-trace per call or per offset
    weight = tiny_model[0].decoder.final_layernorm.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        after = both(MIXED_PROMPTS, 8, temperature=1.0, top_p=0.9, seed=5)
        assert after.logprobs != before.logprobs
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.timeout(180)
def test_finished_rows_leave_the_cache_batch_bitwise(tiny_model, monkeypatch, compiled_calls):
    """Once fewer than half the rows run are still generating, only the active ones (and finished ones up to
    MIN_ROWS_RUN) are run, on CPU with one intra-op thread: bitwise the same tokens and log-probs as running every
    row to the end."""
    from hcx_megatron.inference import kv_generate
    from hcx_megatron.inference.generate import generate

    rows_run = _count_kv_steps(monkeypatch, dim=0)
    prompts = [[3 + i, 7, 11 + 2 * i][: 1 + i % 3] for i in range(12)]
    # A tenth of the vocabulary stops a response: lengths from 1 to 38 of 40, the last row long alone.
    kw = dict(stop_ids=list(range(0, 300, 10)), vocab_size=300, return_logprobs=True, temperature=1.0, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # SDPA's CPU decode kernel then splits keys by batch: rows are not dropped
        generate(tiny_model, prompts, 40, **kw)
        assert set(rows_run) == {len(prompts)}
        torch.set_num_threads(1)
        drop_below = kv_generate.DROP_FINISHED_BELOW
        for compile_decode in (True, False):
            rows_run.clear()
            compiled_calls.clear()
            dropped = generate(tiny_model, prompts, 40, compile_decode=compile_decode, **kw)
            assert rows_run[0] == len(prompts) and min(rows_run) == kv_generate.MIN_ROWS_RUN < len(prompts) / 2
            assert bool(compiled_calls) == compile_decode
            monkeypatch.setattr(kv_generate, "DROP_FINISHED_BELOW", 0.0)
            rows_run.clear()
            every_row = generate(tiny_model, prompts, 40, compile_decode=compile_decode, **kw)
            monkeypatch.setattr(kv_generate, "DROP_FINISHED_BELOW", drop_below)
            assert set(rows_run) == {len(prompts)}
            assert dropped.tokens == every_row.tokens and dropped.logprobs == every_row.logprobs
            assert dropped.finished == every_row.finished and 1 < len({len(t) for t in dropped.tokens})
    finally:
        torch.set_num_threads(threads)


def _teacher_forced_batch(rows: int, length: int, seed: int) -> dict:
    tokens = torch.randint(0, 300, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
            "position_ids": torch.arange(length).expand(rows, length).contiguous()}


@pytest.mark.timeout(180)
def test_compiled_teacher_forced_pass_is_bitwise_the_eager_and_the_learners_forward(tiny_model, monkeypatch,
                                                                                    compiled_calls):
    """forward_collect (PPO's policy / reference / critic passes) at TP1 x PP1 on CPU runs the forward as a
    dynamo-captured graph: bitwise the outputs, log-probs and entropies of the schedule's eager no-grad forward and
    of the learner's forward (train mode, autograd on: megatron's linear and cross-entropy Functions) of the same
    micro-batches, so PPO's first ratio stays exactly 1; two batch shapes, one graph."""
    from hcx_megatron.rlhf import rollout

    def logits_logp_entropy(out, b):
        x = rollout.scaled_logits(out, 0.7, 300)  # the padded vocabulary rows (300 -> 384) masked
        return torch.cat([out.float(), rollout.token_logprobs(x, b["labels"]).unsqueeze(-1),
                          rollout.vocab_parallel_entropy(x).unsqueeze(-1)], dim=-1)

    model = tiny_model[0]
    assert model.training
    graphs = None
    for rows, length, mbs in ((6, 19, 3), (8, 33, 4)):
        micro = rollout.split_micro(_teacher_forced_batch(rows, length, seed=length), mbs)
        compiled_calls.clear()
        compiled = rollout.forward_collect(tiny_model, micro, logits_logp_entropy)
        assert compiled_calls == ["teacher_forced_forward"] * len(micro) and model.training
        graphs = _unique_graphs() if graphs is None else graphs
        assert _unique_graphs() == graphs  # the second shape reuses the first one's graph
        with monkeypatch.context() as eager_only:
            eager_only.setattr(rollout, "compiled_forward_unsupported_reason", lambda chunks: "the test")
            eager = rollout.forward_collect(tiny_model, micro, logits_logp_entropy)  # megatron's schedule
        assert len(compiled_calls) == len(micro)
        learner = []
        with torch.enable_grad():
            for b in micro:
                out = model(b["tokens"], b["position_ids"], None)
                assert out.requires_grad
                learner.append(logits_logp_entropy(out, b).detach())
        assert compiled.shape == (rows, length, 384 + 2)
        assert torch.equal(compiled, eager) and torch.equal(compiled, torch.cat(learner))


def test_compile_rule_names_the_forwards_it_delays():
    from hcx_megatron.inference.compiled import COMPILE_AFTER_CALLS
    from hcx_megatron.inference.kv_generate import decode_forward
    from hcx_megatron.rlhf.rollout import teacher_forced_forward

    assert set(COMPILE_AFTER_CALLS) == {decode_forward.__name__, teacher_forced_forward.__name__}
    assert min(COMPILE_AFTER_CALLS.values()) > 0


@pytest.mark.timeout(120)
def test_forwards_run_eagerly_until_their_break_even(tiny_model, monkeypatch, compiled_calls):
    """Short runs never pay the trace: a forward runs COMPILE_AFTER_CALLS[its name] eager calls per process before
    it is compiled, decode steps and teacher-forced passes alike."""
    from hcx_megatron.inference import compiled
    from hcx_megatron.inference.generate import generate
    from hcx_megatron.rlhf import rollout

    monkeypatch.setitem(compiled.COMPILE_AFTER_CALLS, "teacher_forced_forward", 3)
    monkeypatch.setitem(compiled.COMPILE_AFTER_CALLS, "decode_forward", 5)
    micro = rollout.split_micro(_teacher_forced_batch(4, 9, seed=1), 2)
    first = rollout.forward_collect(tiny_model, micro, lambda out, b: out)  # calls 1, 2: eager
    assert compiled_calls == []
    second = rollout.forward_collect(tiny_model, micro, lambda out, b: out)  # call 3 eager, call 4 compiled
    assert compiled_calls == ["teacher_forced_forward"] and torch.equal(first, second)
    compiled_calls.clear()
    generate(tiny_model, [[5, 6, 7]] * 4, 9, stop_ids=[], compile_decode=False)  # does not count
    assert compiled_calls == []
    generate(tiny_model, [[5, 6, 7]] * 4, 9, stop_ids=[])  # a prefill, then 8 one-token steps: 5 eager, 3 compiled
    assert compiled_calls == ["decode_forward"] * 3


@pytest.mark.timeout(60)
def test_sdpa_attention_aligns_a_short_query_block_with_the_end_of_the_keys():
    """SDPAAttention with a causal mask type and fewer queries than keys (KV-cached steps): query j is position
    k_len - q_len + j and sees keys 0..that position; a one-token query sees every key. Reference: explicit
    softmax attention with GQA."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from hcx_megatron.model.spec import SDPAAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8)
    attention = SDPAAttention(config, 1, AttnMaskType.causal, "self").eval()
    torch.manual_seed(0)
    k_len, b = 6, 2
    key, value = torch.randn(k_len, b, 2, 8), torch.randn(k_len, b, 2, 8)
    for q_len in (1, 3, k_len):
        query = torch.randn(q_len, b, 4, 8)
        out = attention(query, key, value, None, attn_mask_type=AttnMaskType.causal)
        k, v = (t.repeat_interleave(2, dim=2).permute(1, 2, 0, 3) for t in (key, value))  # [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        visible = torch.arange(k_len)[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None]
        expected = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
        expected = expected.permute(2, 0, 1, 3).reshape(q_len, b, -1)
        assert torch.allclose(out, expected, atol=1e-5), q_len


def test_fp8_models_generate_without_the_kv_cache():
    from types import SimpleNamespace

    from hcx_megatron.inference.kv_generate import kv_cache_unsupported_reason

    assert "FP8" in kv_cache_unsupported_reason(SimpleNamespace(fp8="hybrid"))
    assert kv_cache_unsupported_reason(SimpleNamespace(fp8=None)) is None


def test_drivers_take_the_kv_cache_switch():
    import argparse

    from hcx_megatron.inference.chat import build_parser
    from hcx_megatron.rlhf.ppo import add_ppo_args
    from hcx_megatron.sft import SFTOptions, add_sft_args, options_from_args

    assert build_parser().parse_args(["--load", "x"]).generation_kv_cache is True
    assert build_parser().parse_args(["--load", "x", "--no-generation-kv-cache"]).generation_kv_cache is False
    sft = argparse.ArgumentParser()
    add_sft_args(sft)
    assert options_from_args(sft.parse_args(["--no-generation-kv-cache"]), SFTOptions).generation_kv_cache is False
    ppo = argparse.ArgumentParser()
    add_ppo_args(ppo)
    assert ppo.parse_args(["--prompt-data", "p", "--no-generation-kv-cache"]).generation_kv_cache is False
    assert ppo.parse_args(["--prompt-data", "p"]).generation_kv_cache is True


# -- several layouts (torchrun) ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_layouts(out_path: str) -> dict:
    """One 4-process torchrun world that builds the model under every layout of LAYOUTS in turn (megatron's
    parallel state re-initialised between them) and generates with the KV cache and with the full-prefix path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={_free_port()}",
           os.path.abspath(__file__), out_path]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out_path) as f:
        return json.load(f)


# name -> extra flags; 4 ranks each (the rest is data parallelism, every DP replica generating the same prompts).
LAYOUTS = {
    "tp1": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "tp2_pp2_sp": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_vpp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
}
LOGPROB_TOLERANCE = 1e-4  # across layouts and paths: TP splits and cached attention sum in other orders


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_same_generations_in_every_layout_with_and_without_kv_cache(tmp_path):
    runs = _run_layouts(str(tmp_path / "layouts.json"))
    assert set(runs) == set(LAYOUTS)
    ref = runs["tp1"]["full_prefix"]
    assert [len(t) for t in ref["greedy"]] == [8] * len(PROMPTS)
    assert ref["sampled"] != ref["greedy"]
    assert all(lp <= 0 for row in ref["greedy_logprobs"] for lp in row)
    # Stop ids: the response ends with the first stop token and is marked finished; others run to the limit.
    stop = ref["stop_id"]
    for full, cut, done in zip(ref["greedy"], ref["stopped"], ref["stopped_finished"]):
        if stop in full:
            assert cut == full[: full.index(stop) + 1] and done
        else:
            assert cut == full and not done
    assert any(ref["stopped_finished"]) and not all(ref["stopped_finished"])
    for name, run in runs.items():
        for path in ("full_prefix", "kv_cache"):
            out = run[path]
            where = f"{name} {path}"
            for key in ("greedy", "sampled", "stopped", "stopped_finished", "dp_split"):
                assert out[key] == ref[key], f"{where}: {key} differs from TP1's full-prefix path"
            for key in ("greedy_logprobs", "sampled_logprobs"):
                for a, b in zip(ref[key], out[key]):
                    assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_TOLERANCE, (where, key)
    # Sequence parallelism really ran in tp2_sp's full-prefix path and is restored switch by switch after the KV path.
    for name in ("tp2_sp", "tp2_pp2_sp"):
        before, after = runs[name]["sequence_parallel"]
        assert before["config"] is True and sum(v is True for v in before.values()) > 4
        assert after == before
    # The DP split sample equals the one-batch sample (seeded per prompt index).
    assert ref["dp_split"] == ref["sampled"]


def _sequence_parallel_state(chunks) -> dict:
    """Every sequence-parallel switch of the model (the KV path turns them off during a call)."""
    from hcx_megatron.inference.kv_generate import SEQUENCE_PARALLEL_ATTRS

    state = {"config": chunks[0].config.sequence_parallel}
    for c, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            for attr in SEQUENCE_PARALLEL_ATTRS:
                if hasattr(module, attr):
                    state[f"{c}.{name}.{attr}"] = getattr(module, attr)
    return state


def _worker(out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed.env import world_size_from_env
    from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
    from hcx_megatron.inference.generate import generate, generate_data_parallel
    from hcx_megatron.model.builder import build_model

    results = {}
    for name, flags in LAYOUTS.items():
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        cfg, _ = parse_config(["--mock-data", "--device", "cpu", "--num-layers", "4", "--hidden-size", "64",
                               "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
                               "--vocab-size", "300", "--seed", "7", *flags], world_size=world_size_from_env())
        _, device = initialize_distributed(cfg)
        chunks = build_model(cfg, device, wrap_ddp=False).chunks
        results[name] = {}
        before = _sequence_parallel_state(chunks)
        for path, kv in (("full_prefix", False), ("kv_cache", True)):
            # The compiled decode step (TP1 x PP1 only) is checked bitwise in-process; tracing it in 4 ranks here
            # would add ~10 s.
            opts = dict(kv_cache=kv, compile_decode=False)
            greedy = generate(chunks, PROMPTS, 8, stop_ids=[], vocab_size=300, return_logprobs=True, **opts)
            sampled = generate(chunks, PROMPTS, 8, temperature=1.0, top_p=0.9, stop_ids=[], seed=5, vocab_size=300,
                               return_logprobs=True, **opts)
            stop_id = greedy.tokens[0][3]
            stopped = generate(chunks, PROMPTS, 8, stop_ids=[stop_id], vocab_size=300, **opts)
            split = generate_data_parallel(chunks, PROMPTS, 8, temperature=1.0, top_p=0.9, stop_ids=[], seed=5,
                                           vocab_size=300, **opts)
            results[name][path] = {
                "greedy": greedy.tokens, "greedy_logprobs": greedy.logprobs, "sampled": sampled.tokens,
                "sampled_logprobs": sampled.logprobs, "stop_id": stop_id,
                "stopped": stopped.tokens, "stopped_finished": stopped.finished, "dp_split": split.tokens}
        results[name]["sequence_parallel"] = [before, _sequence_parallel_state(chunks)]
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
