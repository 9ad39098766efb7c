"""The one sequence-length rule (hcx_megatron/config/sequence.py) and its use by every driver and by generation.

The rule is checked against what each rank actually holds: megatron's load-balanced context-parallel split
(2*CP equal chunks, rank r keeps chunks r and 2*CP-1-r), then the sequence-parallel split of the rank's share
over TP, and Transformer Engine's FP8 GEMM shape check (16 tokens per rank). The drivers are checked through
their own set-up functions in one process (a single-rank gloo world, no launcher).
"""

from __future__ import annotations

import bisect
import json
import math
import socket

import pytest
import torch

from hcx_megatron.config.sequence import (
    FP8_TOKEN_MULTIPLE, pad_length, sequence_multiple, sequence_multiple_for, sequence_multiple_of_model,
)

TPS, SPS, CPS, FP8S = (1, 2, 4, 8), (False, True), (1, 2, 4), (False, True)
GRID = [(tp, sp, cp, fp8) for tp in TPS for sp in SPS for cp in CPS for fp8 in FP8S]
LENGTHS = range(1, 301)
# A few layouts for the drivers: plain, SP, SP+FP8, CP+FP8, everything, SP+CP.
DRIVER_LAYOUTS = [(1, False, 1, False), (2, True, 1, False), (4, True, 1, True), (2, False, 2, True),
                  (8, True, 4, True), (2, True, 2, False)]


def rank_shares(length: int, tp: int, sp: bool, cp: int) -> list[int] | None:
    """Tokens each (CP rank, TP rank) holds after the CP split and the SP split; None if a split is uneven."""
    tokens = torch.arange(length)
    if cp > 1:
        if length % (2 * cp):
            return None
        chunks = tokens.view(2 * cp, -1)
        cp_parts = [torch.cat([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]
    else:
        cp_parts = [tokens]
    sp_div = tp if sp and tp > 1 else 1
    shares = []
    for part in cp_parts:
        if part.numel() % sp_div:
            return None
        shares += [piece.numel() for piece in part.chunk(sp_div)]
    return shares


def layout_accepts(length: int, tp: int, sp: bool, cp: int, fp8: bool) -> bool:
    shares = rank_shares(length, tp, sp, cp)
    if shares is None or len(set(shares)) != 1:
        return False
    return not fp8 or shares[0] % FP8_TOKEN_MULTIPLE == 0


def layout_flags(tp: int, sp: bool, cp: int, fp8: bool) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp)]
    return flags + (["--sequence-parallel"] if sp else []) + (["--fp8-format", "hybrid"] if fp8 else [])


# -- the rule ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,sp,cp,fp8", GRID)
def test_padded_length_is_the_smallest_the_layout_accepts(tp, sp, cp, fp8):
    multiple = sequence_multiple(tp, sp, cp, fp8)
    horizon = max(LENGTHS) + multiple
    accepted = [n for n in range(1, horizon + 1) if layout_accepts(n, tp, sp, cp, fp8)]
    assert accepted and accepted[0] == multiple  # the rule is the smallest length the layout accepts
    for length in LENGTHS:
        padded = pad_length(length, multiple)
        smallest = accepted[bisect.bisect_left(accepted, length)]
        assert padded == smallest, (length, padded, smallest)
        shares = rank_shares(padded, tp, sp, cp)
        per_rank = padded // (tp if sp and tp > 1 else 1) // cp
        assert shares == [per_rank] * len(shares)
        if fp8:
            assert per_rank % 16 == 0
        if cp > 1:
            assert padded % (2 * cp) == 0


@pytest.mark.timeout(30)
def test_without_fp8_and_cp_the_multiples_are_unchanged():
    for tp in TPS:
        assert sequence_multiple(tp, True, 1, False) == tp
        assert sequence_multiple(tp, False, 1, False) == 1


@pytest.mark.timeout(60)
def test_config_and_model_views_give_the_same_rule():
    from megatron.core.transformer import TransformerConfig

    from hcx_megatron.config.args import build_parser, config_from_args

    for tp, sp, cp, fp8 in GRID:
        argv = ["--mock-data", "--device", "cpu", *layout_flags(tp, sp, cp, fp8)]
        cfg = config_from_args(build_parser().parse_args(argv), tp * cp)
        assert sequence_multiple_for(cfg) == sequence_multiple(tp, sp, cp, fp8)
        model = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        # The builder turns SP off at TP 1 (megatron refuses it there); set fields directly as a built model has them.
        model.tensor_model_parallel_size, model.context_parallel_size = tp, cp
        model.sequence_parallel, model.fp8 = sp and tp > 1, "hybrid" if fp8 else None
        assert sequence_multiple_of_model(model) == sequence_multiple(tp, sp, cp, fp8)


# -- pretraining: fixed lengths are validated -------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp,sp,cp,fp8", DRIVER_LAYOUTS)
@pytest.mark.parametrize("flag", ["--seq-length", "--long-context-seq-length"])
def test_fixed_lengths_must_be_multiples_of_the_rule(tp, sp, cp, fp8, flag):
    from hcx_megatron.config.args import ConfigError, build_parser, config_from_args, validate_config

    multiple = sequence_multiple(tp, sp, cp, fp8)

    def error(length):
        argv = ["--mock-data", "--device", "cpu", "--num-attention-heads", "8", "--num-query-groups", "8",
                "--max-position-embeddings", "4096", "--seq-length", str(multiple), flag, str(length),
                *layout_flags(tp, sp, cp, fp8)]
        try:
            validate_config(config_from_args(build_parser().parse_args(argv), tp * cp))
        except ConfigError as exc:
            return str(exc)
        return ""

    for length in (multiple, 3 * multiple):
        assert flag not in error(length)  # CPU mode may still refuse FP8/CP, but not for the length
    if multiple > 1:
        message = error(multiple + 1)
        for name in (flag, str(multiple), "--tensor-model-parallel-size", "--sequence-parallel",
                     "--context-parallel-size", "--fp8-format"):
            assert name in message, (name, message)


# -- PPO ---------------------------------------------------------------------------------------------------
class _Tokenizer:
    pad, eod, endofturn_id = 0, 1, 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp,sp,cp,fp8", DRIVER_LAYOUTS)
def test_ppo_rollout_rows_pad_to_the_rule(tp, sp, cp, fp8):
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.rlhf.ppo import add_ppo_args, rollout_settings
    from hcx_megatron.rlhf.rollout import build_sequences, take_rows

    cfg, args = parse_config(["--mock-data", "--device", "cpu", "--prompt-data", "p.jsonl",
                              *layout_flags(tp, sp, cp, fp8)], extra_args=add_ppo_args, world_size=tp * cp,
                             validate=False)
    settings = rollout_settings(cfg, args, _Tokenizer())
    assert settings.seq_multiple == sequence_multiple_for(cfg)
    prompts, responses = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14, 15]]
    rows = build_sequences(prompts, responses, settings.pad_id, settings.seq_multiple, 2)
    width = rows["tokens"].shape[1]
    assert width % settings.seq_multiple == 0 and width - settings.seq_multiple < 1 + max(map(len, prompts)) + 5
    # Padding adds no action: the mask covers exactly the response tokens' label positions.
    assert rows["mask"].sum().item() == sum(map(len, responses))
    assert rows["tokens"][1, :6].tolist() == [8, 11, 12, 13, 14, 15]
    one = take_rows(rows, [0], settings.seq_multiple)  # a rank's share is padded by the same rule
    assert one["tokens"].shape[1] % settings.seq_multiple == 0 and one["mask"].sum().item() == 2


# -- drivers that need a process group: one rank, in this process --------------------------------------------
@pytest.fixture(scope="module")
def single_rank_world():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hcx_megatron.distributed import cpu_mode

    # The drivers import megatron's models, which must happen before CPU mode patches torch (as in a run).
    import hcx_megatron.inference.generate  # noqa: F401
    import hcx_megatron.rlhf.reward  # noqa: F401
    import hcx_megatron.sft  # noqa: F401

    # A leftover process group from another in-process test would be a bug there: fail, do not skip.
    assert not dist.is_initialized(), "a process group already exists in this process"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    was_active = cpu_mode.is_active()
    cpu_mode.activate()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        if not was_active:
            cpu_mode.deactivate()


def _chat_jsonl(path, n: int) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": "question " * (1 + i % 7) + str(i)},
                                             {"role": "assistant", "content": "answer " * (1 + i % 5)}]}) + "\n")
    return str(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,sp,cp,fp8", DRIVER_LAYOUTS)
def test_sft_rows_pad_to_the_rule(tp, sp, cp, fp8, single_rank_world, tiny_tokenizer_dir, tmp_path):
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.data.sft_dataset import collate
    from hcx_megatron.sft import SFTOptions, SFTTask, add_sft_args, options_from_args

    cfg, ns = parse_config(["--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir, "--seq-length", "512",
                            "--data-path", _chat_jsonl(tmp_path / "chat.jsonl", 24), "--split", "90,10,0",
                            *layout_flags(tp, sp, cp, fp8)], extra_args=add_sft_args, world_size=tp * cp,
                           validate=False)
    task = SFTTask(options_from_args(ns, SFTOptions))
    task.setup(cfg, "cpu")
    assert task.pad_multiple == math.lcm(8, sequence_multiple_for(cfg))  # --sft-pad-to-multiple-of 8 (default)
    plan = task.train_plan
    for g in range(plan.num_batches):
        batch = plan.batch(g)
        mb = collate(task.train, batch, task.pad_multiple, False)  # unpacked rows
        width, longest = mb["tokens"].shape[1], max(task.train[i].input_length for unit in batch for i in unit)
        assert width % task.pad_multiple == 0 and width - task.pad_multiple < longest <= width
        # Padding adds no loss: the mask holds exactly the conversations' own assistant targets.
        expected = sum(int(task.train[i].loss_mask[1:].sum()) for unit in batch for i in unit)
        assert mb["loss_mask"].sum().item() == expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,sp,cp,fp8", DRIVER_LAYOUTS)
def test_reward_rows_pad_to_the_rule(tp, sp, cp, fp8, single_rank_world, tiny_tokenizer_dir, tmp_path):
    from hcx_megatron.config.args import parse_config
    from hcx_megatron.config.options import options_from_args
    from hcx_megatron.rlhf.reward import RMOptions, RewardModelTask, add_reward_args
    from hcx_megatron.rlhf.synthetic import write_preference_jsonl

    prefs = str(tmp_path / "prefs.jsonl")
    write_preference_jsonl(prefs, 24, seed=0)
    cfg, args = parse_config(["--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir, "--seq-length", "512",
                              "--preference-data", prefs, "--global-batch-size", "4", "--micro-batch-size", "2",
                              *layout_flags(tp, sp, cp, fp8)], extra_args=add_reward_args, world_size=tp * cp,
                             validate=False)
    task = RewardModelTask(options_from_args(args, RMOptions))
    task.setup(cfg, "cpu")
    assert task.multiple_of == sequence_multiple_for(cfg)
    for mb in task.batcher.microbatches(task.batcher.step_examples(0)):
        width, longest = mb["tokens"].shape[1], int(mb["lengths"].max())
        assert width % task.multiple_of == 0 and width - task.multiple_of < longest <= width


# -- generation --------------------------------------------------------------------------------------------
class _CausalStub(torch.nn.Module):
    """Stands in for a GPTModel: the logits at position i depend on tokens[:i+1] only (as with causal
    attention) and pick (sum of the prefix) mod V. Records the padded width of every forward."""

    def __init__(self, config, vocab: int):
        super().__init__()
        from megatron.core.enums import ModelType

        self.config, self.vocab, self.widths = config, vocab, []
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules read it
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def set_input_tensor(self, tensor):
        pass

    def forward(self, tokens, position_ids, attention_mask):
        self.widths.append(tokens.shape[1])
        best = tokens.cumsum(1) % self.vocab
        return torch.nn.functional.one_hot(best, self.vocab).float() * 10 + self.bias


@pytest.mark.timeout(120)
# Generation refuses CP > 1 (sequences are not split over CP ranks there; tests/test_context_parallel.py).
@pytest.mark.parametrize("tp,sp,cp,fp8", [(1, False, 1, False), (2, True, 1, False), (4, True, 1, True),
                                          (1, False, 1, True), (2, False, 1, True)])
def test_generation_pads_to_the_rule_without_changing_tokens(tp, sp, cp, fp8, single_rank_world):
    from megatron.core.transformer import TransformerConfig

    from hcx_megatron.inference.generate import generate

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    # The layout is only read from the config here (the process group is one rank), so set it as a built model has it.
    config.tensor_model_parallel_size, config.context_parallel_size = tp, cp
    config.sequence_parallel, config.fp8 = sp, "hybrid" if fp8 else None
    multiple = sequence_multiple_of_model(config)
    vocab, steps, prompts = 50, 6, [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    model = _CausalStub(config, vocab)
    # The full-prefix path is the one that pads (the KV-cached path feeds no padding; tests/test_generate.py).
    out = generate([model], prompts, max_new_tokens=steps, stop_ids=(), pad_id=49, kv_cache=False)

    expected = []
    for p in prompts:
        seq = list(p)
        for _ in range(steps):
            seq.append(sum(seq) % vocab)
        expected.append(seq[len(p):])
    assert out.tokens == expected  # logits read at the last real position: the pads (id 49) change nothing
    longest = max(map(len, prompts))
    assert model.widths == [pad_length(longest + k, multiple) for k in range(steps)]
