"""tools/gpu_check.sh / tools/gpu_check.py without a GPU: the shell scripts lint clean, the pure helpers decide
correctly, and the whole check runs in CPU mode (--device cpu --tiny: the same step functions, real torchrun
processes) with exactly the expected steps passing — so the script cannot rot while no GPU is at hand.

The CPU run blocks kiwipiepy and zstandard (tools/gpu_wheels.sh does not carry them to the lent GPU machine): the
check must not need them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(REPO, "tools", name) for name in ("gpu_check.sh", "gpu_wheels.sh")]
sys.path.insert(0, os.path.join(REPO, "tools"))
import gpu_check  # noqa: E402

NOT_CARRIED = ["kiwipiepy", "zstandard"]  # left out of .whl/ by tools/gpu_wheels.sh
# What CPU mode can and cannot show; a step that breaks turns its PASS into FAIL and this test fails.
EXPECTED_CPU_STATUS = {
    "environment": "PASS",
    "pretrain_throughput": "PASS",
    "save_resume": "PASS",
    "recompute": "PASS",
    "long_sequence_memory": "SKIP",  # peak-allocation linearity needs CUDA
    "generation": "PASS",
    "attention_kernels": "PASS",  # flash_cpu serves both cases: the no-math criterion holds on CPU too
    "transformer_engine": "SKIP",
    "context_parallel": "SKIP",
    "megatron_fsdp": "PASS",  # FSDP at DP 2 == DDP on CPU; its TP2 x DP2 part needs GPUs with TE (said in the message)
}

# A module mapped to None in sys.modules is absent as far as `import` (ModuleNotFoundError) and
# importlib.util.find_spec (None) can tell: what the lent machine looks like to optional-import probes.
BLOCKER = """
import os, sys

for name in filter(None, os.environ.get("HCX_TEST_BLOCK_IMPORTS", "").split(",")):
    sys.modules[name] = None
"""


def _env_blocking(tmp_path, modules: list[str]) -> dict[str, str]:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HCX_TEST_BLOCK_IMPORTS": ",".join(modules),
            "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}


# -- pure helpers -------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_memory_linearity_tells_linear_from_quadratic():
    seqs = [4096, 8192, 16384, 32768]
    static, per_token = 30.0, 2.0 / 4096  # GiB
    linear = [static + per_token * s for s in seqs]
    ok, numbers, msg = gpu_check.memory_linearity(seqs, linear, 0.25)
    assert ok, msg
    assert numbers["static_gib"] == pytest.approx(static)
    assert numbers["activation_ratio_32768"] == pytest.approx(8.0)
    # An [s, s] score matrix per layer on top: 32 heads x s^2 x 2 bytes x 2 layers.
    quadratic = [m + 32 * s * s * 2 * 2 / 2**30 for m, s in zip(linear, seqs)]
    ok, numbers, msg = gpu_check.memory_linearity(seqs, quadratic, 0.25)
    assert not ok and numbers["activation_ratio_32768"] > 8 * 1.25, msg
    assert not gpu_check.memory_linearity(seqs[:2], linear[:2], 0.25)[0]  # two points only fix the line
    assert not gpu_check.memory_linearity(seqs[:3], [5.0, 5.0, 5.0], 0.25)[0]  # nothing grows with s


@pytest.mark.timeout(60)
def test_loss_and_throughput_helpers():
    ref = [{"iteration": i, "lm_loss": 10.0 - i} for i in range(1, 6)]
    same = [dict(r) for r in ref[3:]]
    assert gpu_check.loss_differences(ref, same, range(4, 6)) == {"iterations": [4, 5], "max_abs_diff": 0.0,
                                                                  "bitwise_equal": True}
    off = [{"iteration": 4, "lm_loss": 6.0}, {"iteration": 5, "lm_loss": 5.003}]
    diff = gpu_check.loss_differences(ref, off, range(4, 6))
    assert diff["max_abs_diff"] == pytest.approx(0.003) and not diff["bitwise_equal"]
    with pytest.raises(ValueError, match="missing"):
        gpu_check.loss_differences(ref, off, range(3, 6))

    recs = [{"step_time_s": t, "tokens_per_sec_per_gpu": 8 / t, "tflops_per_gpu": 1 / t, "mfu": 0.1 / t}
            for t in (9.0, 1.0, 2.0, 3.0)]
    med = gpu_check.median_throughput(recs, warmup=1)
    assert med["step_time_s"] == 2.0 and med["steady_steps"] == 3 and "mfu_full_attention" not in med
    for r in recs:
        r["tflops_per_gpu_full_attention"], r["mfu_full_attention"] = 2 / r["step_time_s"], 0.2 / r["step_time_s"]
    assert gpu_check.median_throughput(recs, warmup=1)["tflops_per_gpu_full_attention"] == 1.0

    rows = [{"case": "causal_gqa", "kernel": "flash", "backward_kernel": "flash"},
            {"case": "packed_gqa", "kernel": "efficient", "backward_kernel": "math"}]
    assert gpu_check.math_kernel_cases(rows) == ["packed_gqa"]


# -- shell scripts --------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_shell_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    proc = subprocess.run(["bash", SCRIPTS[0]], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash tools/gpu_check.sh OUT_DIR" in proc.stderr


@pytest.mark.timeout(120)
def test_shell_scripts_are_shellcheck_clean():
    exe = shutil.which("shellcheck")
    assert exe is not None, "shellcheck not installed: `make test` installs it (tools/install_system_deps.sh)"
    proc = subprocess.run([exe, *SCRIPTS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the check itself, in CPU mode ----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_check_fails_and_stops_when_the_environment_fails(tmp_path):
    """--device cuda without CUDA: step 1 FAILs, later steps are not run but reported FAIL, exit code 1."""
    out = tmp_path / "report"
    proc = subprocess.run(["bash", SCRIPTS[0], str(out), "--device", "cuda", "--steps", "1,2"], cwd=REPO,
                          env=_env_blocking(tmp_path, NOT_CARRIED), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("environment", "FAIL"),
                                                                    ("pretrain_throughput", "FAIL")]
    assert "torch sees no CUDA device" in report["steps"][0]["message"]
    assert report["steps"][1]["message"] == "not run: the environment step failed"
    assert "FAIL 1 environment" in proc.stdout


@pytest.mark.timeout(1200)
def test_cpu_mode_runs_every_step(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(["bash", SCRIPTS[0], str(out), "--device", "cpu", "--tiny"], cwd=REPO,
                          env=_env_blocking(tmp_path, NOT_CARRIED), capture_output=True, text=True, timeout=1150)
    log = proc.stdout[-8000:] + "\n" + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert {name: s["status"] for name, s in steps.items()} == EXPECTED_CPU_STATUS, log
    assert proc.returncode == 0, log
    for s in report["steps"]:  # one console line per step, with its number
        assert f"{s['status']} {s['number']} {s['name']} (" in proc.stdout
    assert report["meta"]["environment"]["megatron_core"] == "0.16.1"

    n = steps["pretrain_throughput"]["numbers"]
    assert n["tokens_per_sec_per_gpu"] > 0 and n["tflops_per_gpu"] > 0 and 0 < n["mfu"] < 1
    assert n["tflops_per_gpu_full_attention"] >= n["tflops_per_gpu"]  # causal attention counted half vs whole

    n = steps["save_resume"]["numbers"]
    assert n["resumed_bitwise_equal"] and n["resumed_max_abs_loss_diff"] == 0 and n["save_at"] == 2
    assert len(n["resumed_losses"]) == 1 and n["checkpoint_gib"] > 0

    n = steps["recompute"]["numbers"]
    assert n["selective_max_abs_loss_diff"] == 0 and n["full_max_abs_loss_diff"] == 0

    n = steps["long_sequence_memory"]["numbers"]
    assert n["peak_mem_gib_64"] > 0 and n["peak_mem_gib_128"] > 0
    assert "CUDA" in steps["long_sequence_memory"]["message"]

    n = steps["generation"]["numbers"]
    assert n["deterministic"] and n["new_tokens"] == len(gpu_check.PROMPT_TEXTS) * 6 and n["tokens_per_sec"] > 0

    n = steps["attention_kernels"]["numbers"]
    assert {r["case"] for r in n["rows"]} >= {"causal_gqa", "packed_gqa"}
    assert not gpu_check.math_kernel_cases(n["rows"])

    assert "Transformer Engine" in steps["transformer_engine"]["message"]
    assert "--context-parallel-size" in steps["context_parallel"]["message"]

    md = (out / "gpu_check.md").read_text()
    assert "| 3 | save_resume | **PASS** |" in md and "| 9 | context_parallel | **SKIP** |" in md
    logs = (out / "gpu_check_logs.txt").read_text()
    assert "===== save_at_k.log" in logs and "===== generate.log" in logs


# -- GPU-only branches, on simulated runs ----------------------------------------------------------------------

class SimulatedChecker(gpu_check.Checker):
    """CUDA-mode Checker whose driver runs are synthesised from their flags, so the verdict code that only runs
    on a GPU (memory comparisons, tolerances, TE and CP steps) is exercised here. `quadratic` adds an s^2
    term to the memory; `gpus` is what torch.cuda.device_count() would say."""

    def __init__(self, a, work, quadratic=False):
        super().__init__(a, work)
        self.quadratic = quadratic
        self.env_info = {"transformer_engine": True}
        self.calls: list[tuple[int, list[str]]] = []

    def tokenizer_dir(self) -> str:
        return "/nonexistent/tokenizer"

    def pretrain(self, name, flags, nproc=1):
        self.calls.append((nproc, list(flags)))

        def value(flag, default=None):
            return flags[flags.index(flag) + 1] if flag in flags else default

        seq, iters = int(value("--seq-length")), int(value("--train-iters"))
        first = self.a.resume_at + 1 if "--load" in flags else 1
        last = int(value("--exit-interval", iters))
        saving = {None: 1.0, "selective": 1.0, "full": 0.3}[value("--recompute-granularity")]
        activation_gib = seq / 4096 * saving + (seq / 4096) ** 2 * 0.5 * self.quadratic
        te = value("--transformer-impl") == "transformer_engine"
        offset = 1e-3 * te + 5e-3 * ("--fp8-format" in flags) + 1e-4 * (value("--context-parallel-size") == "2")
        records = [{"iteration": i, "lm_loss": 8.0 - 0.1 * i + offset, "mem_gb": 20.0 + activation_gib,
                    "step_time_s": 1.0 / saving ** 0.2, "tokens_per_sec_per_gpu": 4096.0, "tflops_per_gpu": 400.0,
                    "mfu": 0.4} for i in range(first, last + 1)]
        log = os.path.join(self.work, f"{name}.log")
        open(log, "w").close()
        run = gpu_check.Run(name, 0, 1.0, log, records=records)
        if "--load" in flags:
            run.events = [{"event": "load", "iteration": self.a.resume_at}]
        return run


@pytest.mark.timeout(60)
def test_gpu_branches_on_simulated_runs(tmp_path, monkeypatch):
    import torch

    a = gpu_check.parse_args(["--out", str(tmp_path / "out")])
    assert a.device == "cuda" and a.seq_lengths == [4096, 8192, 16384, 32768]  # GPU defaults
    c = SimulatedChecker(a, str(tmp_path))
    c.deadline = float("inf")

    status, numbers, msg = gpu_check.step_pretrain_throughput(c)
    assert status == "PASS" and numbers["mfu"] == 0.4, msg
    assert "--bf16" in c.calls[-1][1] and "--use-distributed-optimizer" in c.calls[-1][1]
    a.min_mfu = 0.5
    assert gpu_check.step_pretrain_throughput(c)[0] == "FAIL"

    status, numbers, msg = gpu_check.step_save_resume(c)
    assert status == "PASS" and numbers["tolerance"] == a.resume_loss_tol, msg

    status, numbers, msg = gpu_check.step_recompute(c)
    assert status == "PASS" and numbers["full_saves_gib"] > 0 and numbers["selective_saves_gib"] == 0, msg

    status, numbers, msg = gpu_check.step_long_sequence_memory(c)
    assert status == "PASS" and numbers["activation_ratio_32768"] == pytest.approx(8.0), msg
    status, numbers, msg = gpu_check.step_long_sequence_memory(SimulatedChecker(a, str(tmp_path), quadratic=True))
    assert status == "FAIL", msg

    status, numbers, msg = gpu_check.step_transformer_engine(c)
    assert status == "PASS", msg
    te_runs = [flags for _, flags in c.calls if "transformer_engine" in flags]
    assert {flags[flags.index("--fp8-recipe") + 1] for flags in te_runs if "--fp8-recipe" in flags} == \
        {"delayed", "tensorwise"}
    c.env_info = {"transformer_engine_error": "ModuleNotFoundError: No module named 'transformer_engine'"}
    status, _, msg = gpu_check.step_transformer_engine(c)
    assert status == "SKIP" and "transformer_engine" in msg

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, _, msg = gpu_check.step_context_parallel(c)
    assert status == "SKIP" and "NCCL refuses two ranks on one device" in msg
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    c.env_info = {"transformer_engine": True}
    status, numbers, msg = gpu_check.step_context_parallel(c)
    assert status == "PASS", msg
    assert c.calls[-1][0] == 2 and "--context-parallel-size" in c.calls[-1][1]
