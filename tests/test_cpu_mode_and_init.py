"""The CPU compatibility module and the layout-independent initialiser, tested without processes."""

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


def test_cpu_mode_is_off_by_default_and_fully_undone():
    original_type = torch.Tensor.type
    cpu_mode.activate()
    cpu_mode.activate()  # idempotent
    cpu_mode.deactivate()
    assert not cpu_mode.is_active()
    assert torch.Tensor.type is original_type
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # a CPU build of torch refuses CUDA again


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
