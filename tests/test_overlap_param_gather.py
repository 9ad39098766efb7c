"""--overlap-param-gather with the distributed optimizer: weights read between steps are the updated ones.

After optimizer.step() each DP rank has updated only its shard; with --overlap-param-gather the all-gather of
the other shards waits for the next forward's pre-hooks. Checkpoints (and every other read outside the forward)
must therefore force that gather first (hcx_megatron.model.builder.sync_params_before_read). Real torchrun runs,
hcx-tiny on mock data.
"""

import pytest
import torch

from hcx_megatron.convert.dist_reader import DistCheckpointReader
from hcx_megatron.model.builder import sync_params_before_read
from hcx_megatron.training.checkpoint import checkpoint_dir, read_latest_iteration
from torchrun_utils import pretrain, read_metrics

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

BASE = ["--model-preset", "hcx-tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "2e-3", "--seed", "7", "--mock-data", "--use-distributed-optimizer",
        "--train-iters", "3", "--save-interval", "1"]
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]


def assert_same_tensors(ref_dir: str, got_dir: str) -> None:
    """Every tensor of the two checkpoints (model weights, and the optimizer state with them) bit for bit."""
    ref, got = DistCheckpointReader(ref_dir), DistCheckpointReader(got_dir)
    keys = sorted(ref.tensors())
    assert keys == sorted(got.tensors())
    assert any(not k.startswith("optimizer.") for k in keys)
    differing = {}
    for key in keys:
        a, b = ref.read(key), got.read(key)
        if not torch.equal(a, b):
            differing[key] = (a.float() - b.float()).abs().max().item()
    assert not differing, f"{got_dir} differs from {ref_dir} (max abs difference per tensor): {differing}"


@pytest.mark.timeout(900)
def test_overlap_checkpoints_hold_the_updated_weights(tmp_path):
    """DP2: 3 steps without the overlap flags (a checkpoint after every step) vs. the same run with them, stopped
    after step 2 and resumed: the checkpoints after steps 1-3 are bitwise identical and so are the losses. The
    save after step 1 is followed by more training, so the forward after a forced gather is covered too.
    PP2 x DP2 (pipeline stages, real data, evaluation) is checked the same way inside
    test_pretrain_checkpoint.py::test_resume_is_exact, whose resumed run overlaps."""
    args, nproc = BASE, 2
    plain, overlap = tmp_path / "plain", tmp_path / "overlap"
    plain_log, overlap_log = tmp_path / "plain.jsonl", tmp_path / "overlap.jsonl"
    pretrain([*args, "--save", str(plain), "--metrics-jsonl", str(plain_log)], nproc=nproc)
    pretrain([*args, *OVERLAP, "--save", str(overlap), "--load", str(overlap), "--exit-interval", "2",
              "--metrics-jsonl", str(overlap_log)], nproc=nproc)
    assert read_latest_iteration(str(overlap)) == 2
    pretrain([*args, *OVERLAP, "--save", str(overlap), "--load", str(overlap), "--metrics-jsonl", str(overlap_log)],
             nproc=nproc)

    for it in (1, 2, 3):
        assert_same_tensors(checkpoint_dir(str(plain), it), checkpoint_dir(str(overlap), it))
    a, b = read_metrics(str(plain_log)), read_metrics(str(overlap_log))
    assert [r["iteration"] for r in b] == [1, 2, 3]  # steps 1-2, then 3 after resuming from the overlap save
    assert [r["lm_loss"] for r in b] == [r["lm_loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    events = [e["event"] for e in read_metrics(str(overlap_log), kind="event")]
    assert events.count("load") == 1


def test_sync_is_a_no_op_without_a_deferred_gather():
    """Bare modules, and DDP chunks whose optimizer step already gathers (no overlap or no distributed
    optimizer), are left alone: no collective is issued."""

    class Chunk(torch.nn.Module):
        def __init__(self, use_distributed_optimizer, overlap_param_gather):
            super().__init__()
            self.ddp_config = type("Cfg", (), {"use_distributed_optimizer": use_distributed_optimizer,
                                               "overlap_param_gather": overlap_param_gather})()
            self.calls = []

        def start_param_sync(self, *unused, force_sync=False, force_dispatch=False):
            self.calls.append(force_sync)

    idle = [Chunk(False, False), Chunk(True, False), Chunk(False, True)]
    deferred = Chunk(True, True)
    sync_params_before_read([torch.nn.Linear(2, 2), *idle, deferred])
    assert [c.calls for c in idle] == [[], [], []]
    assert deferred.calls == [True]  # forced synchronous gather
