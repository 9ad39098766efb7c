"""Activation bytes the built model really saves for backward (saved-tensor hooks, one CPU rank)
against memory.py: linear in sequence length (fused attention, no s x s term), and within the
unfused-kernel overhead of the CPU local path."""

import json
import subprocess
import sys

import pytest

from hcx_megatron.config.model import get_preset
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import layer_activation_bytes

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

SCRIPT = """
import json, sys
from hcx_megatron.perf.measure import measure
out = {s: measure(["--model-preset", "hcx-tiny", "--seq-length", str(s), "--micro-batch-size", "1",
                   "--global-batch-size", "1"]) for s in (128, 256)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_saved_activations_scale_linearly_and_match_the_model_within_unfused_overhead(tmp_path):
    import socket

    with socket.socket() as sock:  # a free port: other test processes may share this machine
        sock.bind(("127.0.0.1", 0))
        env_port = {"MASTER_PORT": str(sock.getsockname()[1])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=280,
                         env={**__import__("os").environ, **env_port})
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    got = {int(k): v for k, v in json.loads(line[7:]).items()}
    assert len(got[128]) == 4 and len(set(got[128])) == 1  # every layer saves the same
    assert got[256][0] == 2 * got[128][0]  # exactly linear in s: no s x s attention matrix is kept
    for s in (128, 256):
        pred = layer_activation_bytes(Workload(get_preset("hcx-tiny"), s, 1, precision="fp32"), Layout())
        ratio = got[s][0] / pred
        # memory.py counts what fused kernels keep (TE norm+linear, fused SwiGLU); the CPU local path
        # runs norms, SwiGLU and RoPE unfused and keeps ~1.65x that (docs/perf.md); activation_memory_factor
        # calibrates it. Below 1 would mean the formula counts tensors that are not saved.
        assert 1.0 <= ratio <= 1.8, ratio
