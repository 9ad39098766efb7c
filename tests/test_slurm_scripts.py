"""The job scripts without a cluster: syntax and shellcheck on every shell script, the #SBATCH contract,
the requeue policy (a pure bash function), the flags they build, and their dry-run plans."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm  # starts a Slurm cluster; not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPTS = ["pretrain_hcx_l.sh", "pretrain_hcx_s.sh", "sft_hcx.sh", "rlhf_hcx.sh"]


def all_shell_scripts() -> list[Path]:
    found = set()
    for pattern in ("slurm/*.sh", "tools/*.sh", "examples/*.sh", "launch/*.sh", "*.sh"):
        found.update(REPO.glob(pattern))
    if (REPO / ".ci" / "run").exists():
        found.add(REPO / ".ci" / "run")
    return sorted(found)


def _shellcheck() -> str:
    exe = shutil.which("shellcheck")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "tools" / "install_system_deps.sh")], capture_output=True, timeout=900)
        exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck is not installed and could not be installed here (needs root + apt-get): run "
                    "tools/install_system_deps.sh (`make test` does)")
    return exe


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    # Knobs a developer may have exported must not change what the scripts build here.
    for k in ("TP", "PP", "CP", "SP", "VP_LAYERS", "DEVICE", "MODEL_PRESET", "DATA_PATH", "MOCK_DATA", "RUN_DIR",
              "RUN_NAME", "EXTRA_ARGS", "HCX_REPO", "CKPT_DIR"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_bash(snippet: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source slurm/common.sh; {snippet}'], cwd=REPO,
                          env=_env(HCX_REPO=str(REPO), **env), capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_every_script_parses_with_bash_n():
    scripts = all_shell_scripts()
    assert {p.name for p in scripts} >= set(JOB_SCRIPTS) | {"common.sh", "install_system_deps.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.timeout(300)
def test_every_script_is_shellcheck_clean():
    exe = _shellcheck()
    scripts = [str(p.relative_to(REPO)) for p in all_shell_scripts()]
    # -x follows `source slurm/common.sh` (paths relative to the repo root, where we run it).
    proc = subprocess.run([exe, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_sbatch_header_contract(name):
    text = (REPO / "slurm" / name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    opts = dict(line.split(None, 1)[1].split("=", 1) if "=" in line else (line.split(None, 1)[1], "")
                for line in header)
    assert opts["--ntasks-per-node"] == "8" and opts["--gpus-per-node"] == "8"
    assert int(opts["--nodes"]) >= 1 and opts["--time"]
    for flag in ("--exclusive", "--requeue"):
        assert flag in opts
    assert opts["--signal"].startswith("B:USR1@")
    assert opts["--open-mode"] == "append" and "%j" in opts["--output"]
    # #SBATCH lines are only read before the first command.
    first_cmd = next(i for i, line in enumerate(text.splitlines()[1:], 1) if line and not line.startswith("#"))
    assert all(text.splitlines().index(h) < first_cmd for h in header)
    assert text.count("hcx_launch ") == 1, "one srun (hcx_launch) per job"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rc,signalled,restarts,failures,expected", [
    (0, 0, 0, 0, "done"),
    (0, 1, 5, 0, "done"),            # finished just as the signal came
    (17, 0, 0, 0, "requeue"),        # preempted and saved
    (143, 1, 3, 0, "requeue"),       # killed after our USR1 forwarding
    (17, 1, 50, 0, "stop"),          # MAX_RESTARTS=50 reached: never requeue forever
    (1, 0, 0, 1, "requeue"),         # first crash
    (1, 0, 1, 2, "requeue"),
    (1, 0, 2, 3, "stop"),            # MAX_FAILURES=3 crashes in a row without a new checkpoint
])
def test_requeue_policy(rc, signalled, restarts, failures, expected):
    proc = run_bash(f"hcx_requeue_decision {rc} {signalled} {restarts} 50 {failures} 3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.timeout(60)
def test_header_value_and_layout_defaults():
    proc = run_bash('hcx_sbatch_header_value nodes slurm/pretrain_hcx_l.sh; '
                    'hcx_layout_defaults hcx-l; echo "$TP $PP $VP_LAYERS $SP"; '
                    'TP=4; hcx_layout_defaults hcx-s; echo "$TP $PP"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["16", "8 4 5 1", "4 4"]


def dry_run(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"slurm/{script}"], cwd=REPO, env=_env(HCX_DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=170)


# A dry run creates nothing, so a path that cannot exist is a fine run dir; each distinct dry run is made once
# (every one imports torch and megatron-core, ~5-15 s on 2 busy cores).
DRY_RUN_DIR = "/nonexistent/hcx-dry-run"
_dry_cache: dict[tuple, subprocess.CompletedProcess] = {}


def dry_run_cached(script: str, **env: str) -> subprocess.CompletedProcess:
    key = (script, tuple(sorted(env.items())))
    if key not in _dry_cache:
        _dry_cache[key] = dry_run(script, RUN_DIR=DRY_RUN_DIR, **env)
    return _dry_cache[key]


PRETRAIN_L_ENV = dict(MOCK_DATA="1")
PRETRAIN_S_CPU_ENV = dict(MOCK_DATA="1", DEVICE="cpu", MODEL_PRESET="hcx-tiny", TP="1", SP="0", DIST_OPT="0",
                          GLOBAL_BATCH="4", SEQ_LENGTH="64", HCX_PLAN_NODES="1", HCX_PLAN_TASKS_PER_NODE="2")
RLHF_ENV = dict(SFT_CKPT="/ck/sft", RM_CKPT="/ck/rm", PROMPT_DATA="/d/p.jsonl", TOKENIZER_MODEL="/t")


@pytest.mark.timeout(180)
def test_pretrain_l_dry_run_plans_its_allocation():
    proc = dry_run_cached("pretrain_hcx_l.sh", **PRETRAIN_L_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "16 node(s) x 8 task(s) = 128 ranks" in out
    assert "TP8 x PP4 VPP4 x CP1 x DP4 + SP + dist-opt on cuda" in out
    assert f"--save {DRY_RUN_DIR}/checkpoints" in out and f"--load {DRY_RUN_DIR}/checkpoints" in out
    assert "--bf16" in out and "--overlap-grad-reduce" in out
    assert not Path(DRY_RUN_DIR).exists()


@pytest.mark.timeout(180)
def test_cpu_overrides_build_cpu_flags():
    proc = dry_run_cached("pretrain_hcx_s.sh", **PRETRAIN_S_CPU_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "--device cpu" in out and "--bf16" not in out and "--sequence-parallel" not in out
    assert "TP1 x PP1 x CP1 x DP2 on cpu" in out


@pytest.mark.timeout(120)
def test_missing_data_is_a_clear_error(tmp_path):
    proc = dry_run("pretrain_hcx_l.sh", RUN_DIR=str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "set DATA_PATH" in proc.stderr and "MOCK_DATA=1" in proc.stderr


@pytest.mark.timeout(180)
def test_sft_passes_its_own_checkpoint_and_the_pretrained_one(tmp_path):
    """The driver decides which one it starts from (hcx_megatron.training.loop.start_of_run, tested in
    tests/test_run_lifecycle.py): --load resumes once it holds a checkpoint, so the line never changes."""
    common = dict(PRETRAINED_CKPT="/ckpt/pretrain", DATA_PATH="/d/sft.jsonl", TOKENIZER_MODEL="/tok",
                  RUN_DIR=str(tmp_path / "run"), CKPT_DIR=str(tmp_path / "ck"))
    proc = dry_run("sft_hcx.sh", **common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--load {tmp_path}/ck --pretrained-checkpoint /ckpt/pretrain" in proc.stdout
    assert "--finetune" not in proc.stdout
    missing = dry_run("sft_hcx.sh", DATA_PATH="/d", TOKENIZER_MODEL="/t", RUN_DIR=str(tmp_path / "r2"))
    assert missing.returncode == 2 and "PRETRAINED_CKPT" in missing.stderr


@pytest.mark.timeout(180)
def test_rlhf_dry_run_passes_model_sources():
    proc = dry_run_cached("rlhf_hcx.sh", **RLHF_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "hcx_megatron.rlhf.ppo" in out and "32 ranks" in out
    assert f"--load {DRY_RUN_DIR}/checkpoints" in out and "--finetune" not in out  # the driver resumes itself
    assert "--prompt-data /d/p.jsonl --sft-checkpoint /ck/sft --rm-checkpoint /ck/rm" in out
    assert "--mock-data" not in out and "--data-path" not in out
    # 200 PPO iterations x 2 epochs x 512 prompts / 128 per step
    assert "--train-iters 1600" in out and "--rollout-batch-size 512" in out
    assert "--placement separate --critic-ranks 8 --reference-ranks 4 --reward-ranks 4" in out


@pytest.mark.timeout(60)
def test_not_in_slurm_without_dry_run_refuses(tmp_path):
    proc = subprocess.run(["bash", "slurm/pretrain_hcx_l.sh"], cwd=REPO,
                          env=_env(MOCK_DATA="1", RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "submit with sbatch" in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script,env", [
    ("pretrain_hcx_l.sh", PRETRAIN_L_ENV),
    ("pretrain_hcx_s.sh", PRETRAIN_S_CPU_ENV),
    ("pretrain_hcx_s.sh", dict(DATA_PATH="0.7 /d/ko_text_document 0.3 /d/en_text_document", TOKENIZER_MODEL="/t",
                               PRECISION="fp8", LONG_CONTEXT_SEQ_LENGTH="32768", RECOMPUTE="full")),
    ("sft_hcx.sh", dict(PRETRAINED_CKPT="/a", DATA_PATH="/d.jsonl", VALID_DATA_PATH="/v.jsonl", TOKENIZER_MODEL="/t",
                        SFT_TOKENS_PER_MICROBATCH="8192", SFT_PACKING="1")),
    ("rlhf_hcx.sh", RLHF_ENV),
])
def test_built_flags_are_accepted_by_the_driver(script, env):
    """Every flag a job script builds parses with its driver's own parser (catches drift between the scripts
    and the drivers; validation needing the real world size is the dry run's job)."""
    import importlib
    import shlex

    from hcx_megatron.config.args import build_parser

    proc = dry_run_cached(script, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # Each script's own allocation and layout: tensor parallelism stays inside a node.
    assert "placement: every TP group inside one node" in proc.stdout and "span nodes" not in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "would start:" in ln)
    driver_argv = shlex.split(line.split(" -- ", 1)[1])
    module = importlib.import_module(driver_argv[0])
    parser = build_parser()
    for name in dir(module):
        fn = getattr(module, name)
        # the driver's own add_*_args (an imported one, e.g. add_generation_args, is called by them)
        if name.startswith("add_") and name.endswith("_args") and getattr(fn, "__module__", None) == module.__name__:
            fn(parser)
    parser.parse_args(driver_argv[1:])  # argparse exits (SystemExit 2) on an unknown flag
