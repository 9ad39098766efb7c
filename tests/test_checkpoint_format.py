"""fsdp_dtensor (--use-megatron-fsdp) and torch_dist checkpoints do not load into runs of the other kind: the
error names the checkpoint and the flag, before anything is read (no process group needed)."""

import json
import types

import pytest

from hcx_megatron.training.checkpoint import CONFIG_FILE, TRACKER_FILE, checkpoint_dir, load_checkpoint


def fake_chunk(fsdp: bool):
    # What load_checkpoint looks at to tell a Megatron-FSDP chunk: megatron's ddp_config.use_megatron_fsdp.
    return types.SimpleNamespace(ddp_config=types.SimpleNamespace(use_megatron_fsdp=fsdp))


@pytest.mark.parametrize("saved_format,fsdp_run", [("fsdp_dtensor", False), ("torch_dist", True), (None, True)])
def test_checkpoint_of_the_other_kind_is_refused(tmp_path, saved_format, fsdp_run):
    root = tmp_path / "ckpt"
    ckpt = checkpoint_dir(str(root), 5)
    (tmp_path / "ckpt" / "iter_0000005").mkdir(parents=True)
    saved = {"iteration": 5, "world_size": 2, "has_optimizer": True}
    if saved_format:  # None: written before the format was recorded, i.e. torch_dist
        saved["checkpoint_format"] = saved_format
    (root / "iter_0000005" / CONFIG_FILE).write_text(json.dumps(saved))
    (root / TRACKER_FILE).write_text("5")
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(root), [fake_chunk(fsdp_run)])
    assert ckpt in str(err.value) and "--use-megatron-fsdp" in str(err.value), str(err.value)
