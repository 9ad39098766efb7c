"""CPU mode: the ONE place that lets megatron-core 0.16.1 run on CPU over gloo.

megatron-core assumes CUDA throughout: it allocates with `device=torch.cuda.current_device()`, creates a few
tensors with `device="cuda"` (e.g. `total_num_tokens` in pipeline_parallel/schedules.py), calls `.cuda()`,
synchronizes streams, keeps the tensor-parallel RNG as CUDA generator states, and the (distributed)
optimizer checks `param.type() == "torch.cuda.FloatTensor"`. Rather than forking megatron-core, `activate()`
redirects exactly those touch points to the CPU:

  device      torch.cuda.current_device() -> torch.device("cpu"); tensor factories and Tensor.to/.cuda,
              Module.cuda given a CUDA device -> CPU
  sync        torch.cuda.synchronize / Stream / Event / stream() / current_stream / nvtx / empty_cache -> no-ops
  memory      torch.cuda.memory_allocated & co. -> 0 (process RSS is reported by our metrics instead)
  RNG         megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state and
              torch.cuda.get_rng_state / set_rng_state / manual_seed -> the CPU default generator, so the
              CudaRNGStatesTracker forks/restores the CPU generator exactly as it would the CUDA one
  type names  Tensor.type() with no argument reports CPU float types under their CUDA names
              ("torch.cuda.FloatTensor"), which is what the optimizers' dtype checks compare against
  FSDP        Megatron-FSDP's coalesced collectives (megatron_fsdp/param_and_grad_buffer.py) complete before
              their coalescing block returns (see `_synchronous_coalescing`)
  ordinal     `cuda_ordinal()`: a context in which torch.cuda.current_device() is the int 0, as on CUDA, for
              code that formats it into a device string (Megatron-FSDP's constructor compares its device with
              torch.device(f"cuda:{torch.cuda.current_device()}")); the model builder wraps only that call in it

It is only ever activated when the run's device is "cpu" (see `initialize_distributed`), is idempotent,
and `deactivate()` undoes every patch (tests use it). Nothing else in the project patches torch or megatron.

The patches are process-wide while active, so they must not change any call that does not target CUDA: another
library in the same process (transformers, in the conversion `--verify`) gives bitwise the same results before,
during and after CPU mode. That includes torch's own caches of its functions: `with torch.device("meta")` (how
transformers' `from_pretrained` builds a model) recognises factories by identity in a set that torch fills on
first use and keeps for the life of the process; filled while the factories are our wrappers, the device context
would ignore torch's real factories from then on, even after `deactivate()` (transformers then left its rotary
`inv_freq` buffer uninitialised: garbage or NaN logits). `activate()` fills such caches before patching.
torch.compile's tables of torch functions, which torch clears when a process group is created, are built from the
originals by `prepare_torch_compile()` (hcx_megatron/inference/compiled.py calls it before compiling a forward)
and dropped by `deactivate()`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

_CPU = torch.device("cpu")
_saved: list[tuple[Any, str, Any]] = []  # (owner, attribute, original or _ABSENT) for deactivate()
_active = False

# torch factories that accept `device=`; megatron-core passes torch.cuda.current_device() or "cuda".
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "empty_strided", "linspace", "eye", "scalar_tensor",
)
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def is_active() -> bool:
    return _active


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means an accelerator ordinal


_ABSENT = object()  # `owner` had no attribute of its own (e.g. Tensor.to lives on TensorBase): delete on undo


def _patch(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


def _fill_torch_identity_caches() -> None:
    """Caches that torch fills lazily with the identity of its own functions must hold the originals, not our
    wrappers: they outlive `deactivate()`. The device context manager's set of factories is the one that changes
    results (see the module docstring)."""
    from torch.utils import _device

    _device._device_constructors()


def _cpu_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)  # pinned memory needs CUDA
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream / ExternalStream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(*args, **kwargs):
    return None


def _synchronous_coalescing(coalescing_manager: Callable) -> Callable:
    """torch.distributed._coalescing_manager with `async_ops` ignored: the block's collectives complete when it
    exits, and the manager it yields has no work left to wait for.

    Megatron-FSDP issues its parameter all-gathers as one asynchronous coalesced work per bucket group and leaves it
    in flight while the backward computes and prefetches further groups; on CUDA the streams order that. On gloo,
    DP2 training of hcx-tiny corrupted the heap in about 7% of runs (glibc "malloc(): unaligned tcache chunk
    detected" and SIGABRT in one rank, "Connection reset by peer" in `wait_bucket_ready` in the other; 4 of 56
    runs here, 2 of ~10 in CI), and in none of the runs with the gathers completed in place (docs/benchmarks.md,
    "Megatron-FSDP on gloo"). Which buffer the in-flight work wrote after it was freed was not pinned down. On
    CPU nothing overlaps with a collective anyway, so waiting where it is issued costs nothing measurable."""

    @contextlib.contextmanager
    def synchronous(group=None, device=None, async_ops=False):
        with coalescing_manager(group, device, async_ops=False) as manager:
            yield manager

    return synchronous


def activate() -> None:
    """Install the CPU redirections. Call once per process, before building megatron models."""
    global _active
    if _active:
        return
    import megatron.core.tensor_parallel.random as mc_random

    _fill_torch_identity_caches()
    cuda = torch.cuda
    # Device.
    _patch(cuda, "current_device", lambda: _CPU)
    _patch(cuda, "set_device", _noop)
    _patch(cuda, "synchronize", _noop)
    _patch(cuda, "empty_cache", _noop)
    for name in _FACTORIES:
        _patch(torch, name, _cpu_device_kwarg(getattr(torch, name)))

    tensor_to = torch.Tensor.to

    @functools.wraps(tensor_to)
    def to(self, *args, **kwargs):
        # Hot in inference (megatron's RoPE calls .to(dtype) per layer and step): a dtype, the common first
        # argument, and an empty kwargs skip the device checks, whose answer for them is "not CUDA" anyway.
        if args and args[0].__class__ is not torch.dtype and _is_cuda(args[0]):
            args = (_CPU,) + args[1:]
        if kwargs and _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return tensor_to(self, *args, **kwargs)

    _patch(torch.Tensor, "to", to)
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _patch(torch.nn.Module, "cuda", lambda self, *a, **k: self)

    tensor_type = torch.Tensor.type

    @functools.wraps(tensor_type)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = tensor_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return tensor_type(self, dtype, non_blocking, **kwargs)

    _patch(torch.Tensor, "type", type_)

    # Streams, events, profiling ranges.
    _patch(cuda, "Stream", _NullStream)
    _patch(cuda, "ExternalStream", _NullStream)
    _patch(cuda, "Event", _NullEvent)
    _patch(cuda, "current_stream", lambda *a, **k: _NullStream())
    _patch(cuda, "default_stream", lambda *a, **k: _NullStream())
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _patch(cuda, "set_stream", _noop)
    _patch(cuda.nvtx, "range_push", _noop)
    _patch(cuda.nvtx, "range_pop", _noop)
    _patch(cuda.nvtx, "range", lambda *a, **k: contextlib.nullcontext())
    # Memory statistics.
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        _patch(cuda, name, lambda *a, **k: 0)
    _patch(cuda, "memory_stats", lambda *a, **k: {})
    _patch(cuda, "reset_peak_memory_stats", _noop)

    # RNG: the tensor-parallel tracker keeps "CUDA" generator states; on CPU they are CPU generator states.
    _patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(cuda, "manual_seed_all", _noop)  # torch.manual_seed calls it; the CPU generator is already seeded
    _patch(mc_random, "_get_cuda_rng_state",
           lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    _patch(mc_random, "_set_cuda_rng_state",
           lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    fsdp_buffers = _megatron_fsdp_buffers()
    if fsdp_buffers is not None:
        _patch(fsdp_buffers, "_coalescing_manager", _synchronous_coalescing(fsdp_buffers._coalescing_manager))
    _active = True


def _megatron_fsdp_buffers():
    """megatron-core 0.16.1's Megatron-FSDP buffer module, or None where it does not import."""
    try:
        from megatron.core.distributed.fsdp.src.megatron_fsdp import param_and_grad_buffer
    except ImportError:
        return None
    return param_and_grad_buffer


def prepare_torch_compile() -> None:
    """Let torch.compile (dynamo) trace code while CPU mode is active, exactly: dynamo decides how to treat a torch
    function from tables keyed by the identity of the objects under torch's names
    (`torch._dynamo.trace_rules.get_torch_obj_rule_map` / `get_tensor_method`, built lazily, cleared when the
    default process group is created). Built while the patches are in place they would list our wrappers under
    torch's names (and refuse `_noop`, found under names with different rules). Built here from torch's own
    objects, our patches are plain Python that dynamo inlines (torch.cuda.current_device() folds to the CPU
    device). The patches are lifted while the tables are built: call only where no other thread runs torch code.
    No-op when CPU mode is not active or the tables are already built."""
    if not _active:
        return
    from torch._dynamo import trace_rules

    if trace_rules.get_torch_obj_rule_map.cache_info().currsize:
        return  # built since the last clear; by us or before activate() (clear_lru_cache rebuilds after a clear)
    current = [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name, _ in _saved]
    try:
        for owner, name, original in reversed(_saved):
            _set_or_delete(owner, name, original)
        trace_rules.clear_lru_cache()
        trace_rules.get_torch_obj_rule_map()
        trace_rules.get_tensor_method()
    finally:
        for owner, name, value in current:
            _set_or_delete(owner, name, value)


def _set_or_delete(owner: Any, name: str, value: Any) -> None:
    if value is _ABSENT:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextlib.contextmanager
def cuda_ordinal():
    """torch.cuda.current_device() returns the CUDA ordinal 0 inside (see the module docstring); factories and
    Tensor.to still map that ordinal to the CPU. No-op when CPU mode is not active."""
    if not _active:
        yield
        return
    cuda = torch.cuda
    current = cuda.current_device
    cuda.current_device = lambda: 0
    try:
        yield
    finally:
        cuda.current_device = current


def deactivate() -> None:
    """Undo every patch (in reverse order)."""
    global _active
    while _saved:
        owner, name, original = _saved.pop()
        _set_or_delete(owner, name, original)
    _active = False
    import sys

    if "torch._dynamo" in sys.modules:
        # Tables dynamo may have built while the patches were in place would outlive them (prepare_torch_compile).
        sys.modules["torch._dynamo"].trace_rules.clear_lru_cache()
