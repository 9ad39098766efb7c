"""The CPU compatibility module and the layout-independent initialiser, tested without torchrun."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hcx_megatron.distributed import cpu_mode
from hcx_megatron.model.init import global_param_name, normal_rows


@pytest.fixture
def active_cpu_mode():
    assert not cpu_mode.is_active()
    cpu_mode.activate()
    yield
    cpu_mode.deactivate()


def test_cpu_mode_redirects_cuda_touch_points(active_cpu_mode):
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.zeros(3, device="cuda")  # what megatron's schedules do for total_num_tokens
    assert t.device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert t.cuda() is t and t.to("cuda").device.type == "cpu"
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # the optimizers' dtype checks
    assert torch.ones(2).type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        ev = torch.cuda.Event()
        ev.record()
    assert torch.cuda.max_memory_allocated() == 0


def test_cpu_mode_rng_tracker_forks_the_cpu_generator(active_cpu_mode):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is restored after the fork
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked stream advanced
    tracker2 = CudaRNGStatesTracker()
    tracker2.add("model-parallel-rng", 123)
    with tracker2.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), a)


def test_cpu_mode_completes_megatron_fsdp_coalesced_gathers_in_place():
    """Megatron-FSDP's asynchronous coalesced all-gathers, left in flight on gloo, corrupted the heap in ~7% of DP2
    runs; in CPU mode its coalescing blocks complete their collectives on exit (nothing left for the manager to
    wait on), and deactivate() gives megatron its manager back. Other code's manager is untouched."""
    import torch.distributed as dist
    from megatron.core.distributed.fsdp.src.megatron_fsdp import param_and_grad_buffer as fsdp_buffers

    original = fsdp_buffers._coalescing_manager
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0], backend="gloo")

        def gather(manager):
            out, shard = torch.zeros(4), torch.arange(4.0)
            with manager(group, async_ops=True) as cm:
                dist.all_gather_into_tensor(out, shard, group=group, async_op=True)
            works = list(cm.works)
            cm.wait()
            return works, out

        assert len(gather(original)[0]) == 1  # megatron's own manager: one work left in flight
        cpu_mode.activate()
        try:
            works, out = gather(fsdp_buffers._coalescing_manager)
            assert works == [] and torch.equal(out, torch.arange(4.0))
            assert dist._coalescing_manager is original  # only megatron-fsdp's name is patched
        finally:
            cpu_mode.deactivate()
        assert fsdp_buffers._coalescing_manager is original
    finally:
        dist.destroy_process_group()


def test_cpu_mode_is_off_by_default_and_fully_undone():
    original_type = torch.Tensor.type
    cpu_mode.activate()
    cpu_mode.activate()  # idempotent
    cpu_mode.deactivate()
    assert not cpu_mode.is_active()
    assert torch.Tensor.type is original_type
    assert not {"to", "cuda", "type"} & set(vars(torch.Tensor))  # inherited from TensorBase, as before
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # a CPU build of torch refuses CUDA again


# Issue 13's scenario in one process: a tiny random transformers Llama built and run before CPU mode; loaded with
# `from_pretrained` and run while CPU mode is active, next to megatron's CPU-mode model; and again after
# deactivate(). In a fresh interpreter: the bug lived in a torch cache that fills on first use (the meta-device
# context `from_pretrained` builds under), and in pytest's process another test may have filled it already.
HF_BEFORE_DURING_AFTER = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from hcx_megatron.convert import mcore_runtime as rt  # megatron's model modules load before CPU mode patches
from hcx_megatron.convert.hf_config import model_config_from_hf
from hcx_megatron.distributed import cpu_mode

hf_dir, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False)
built = LlamaForCausalLM(config)  # from a config: no device context, torch's lazy caches stay empty
built.save_pretrained(hf_dir)
tokens = torch.randint(0, config.vocab_size, (2, 24))


def run(model):
    with torch.no_grad():
        return {"logits": model.eval()(tokens).logits, "inv_freq": model.model.rotary_emb.inv_freq.clone()}


def load():
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


results = {"before": run(built)}
cpu_mode.activate()
with open(hf_dir + "/config.json") as f:
    cfg = rt.cpu_config(model_config_from_hf(json.load(f)))
rt.init_processes(cfg)
chunks = rt.build_chunks(cfg, initialize=True)
megatron_logits = rt.logits(chunks, tokens, config.vocab_size)
assert cpu_mode.is_active() and torch.isfinite(megatron_logits).all()
results["during"] = run(load())
rt.shutdown_processes()
cpu_mode.deactivate()
assert not cpu_mode.is_active()
results["after"] = run(load())
torch.save(results, out)
"""


def test_transformers_llama_is_bitwise_the_same_before_during_and_after_cpu_mode(tmp_path):
    out = str(tmp_path / "results.pt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a 1-rank world of its own
    proc = subprocess.run([sys.executable, "-c", HF_BEFORE_DURING_AFTER, str(tmp_path / "hf"), out], env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    before = results["before"]
    assert torch.isfinite(before["logits"]).all()
    for phase in ("during", "after"):
        assert torch.equal(results[phase]["inv_freq"], before["inv_freq"]), (phase, results[phase]["inv_freq"])
        assert torch.equal(results[phase]["logits"], before["logits"]), \
            (phase, (results[phase]["logits"] - before["logits"]).abs().max().item())


def test_virtual_tensor_slices_are_layout_independent():
    full = normal_rows(7, "decoder.layers.3.mlp.linear_fc1.weight", 0, 12, 10, 0.02)
    for tp in (2, 3, 4):
        rows = 12 // tp
        parts = [normal_rows(7, "decoder.layers.3.mlp.linear_fc1.weight", r * rows, (r + 1) * rows, 10, 0.02)
                 for r in range(tp)]
        np.testing.assert_array_equal(np.concatenate(parts), full)
    assert abs(full.std() - 0.02) < 0.01
    other = normal_rows(8, "decoder.layers.3.mlp.linear_fc1.weight", 0, 12, 10, 0.02)
    assert not np.allclose(other, full)  # the seed matters
    assert not np.allclose(normal_rows(7, "decoder.layers.2.mlp.linear_fc1.weight", 0, 12, 10, 0.02), full)


def test_global_names_use_global_layer_numbers():
    offsets = {0: 6, 1: 7}
    assert global_param_name("decoder.layers.1.mlp.linear_fc2.weight", offsets) == "decoder.layers.7.mlp.linear_fc2.weight"
    assert global_param_name("embedding.word_embeddings.weight", offsets) == "embedding.word_embeddings.weight"
