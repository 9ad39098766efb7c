#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh installs on a GPU machine that has no internet and no megatron-core.
#
#   bash tools/gpu_wheels.sh            # -> .whl/ at the repository root (git-ignored; carry it to the GPU machine)
#   bash tools/gpu_wheels.sh DIR
#
# Target: Python 3.12 (CPython) on x86_64 Linux, the lent machine's interpreter (torch 2.11 + CUDA 13, transformers,
# numpy, pyyaml, psutil, tqdm, tensorboard, tokenizers, sentencepiece, safetensors already there). Wheels are fetched
# with --no-deps for exactly that platform, so this runs on any machine with pip and internet (this one: 3.11).
#
# What the GPU check imports that the lent machine lacks:
#   megatron-core==0.16.1  the project's base (compiled helpers: a cp312 manylinux wheel)
#   packaging              megatron-core requires >=24.2; the machine's copy may be older (transformers needs >=20)
#   einops                 Megatron-FSDP (step 10, --use-megatron-fsdp) lays out its device mesh with it
# Deliberately NOT downloaded:
#   kiwipiepy (+ kiwipiepy_model, ~80 MB)  imported lazily, only to train tokenizers with the Korean morpheme
#                          split; the check trains its tokenizer without it (tests/test_gpu_check.py runs the
#                          check with kiwipiepy blocked to keep that true)
#   zstandard              imported lazily, only to read .jsonl.zst inputs; the check uses --mock-data (also blocked
#                          in the test)
#   transformer-engine     its CUDA 13 build is hundreds of MB (over the 64 MiB a lent machine carries) and needs a
#                          matching toolkit; step 8 of the check reports SKIP with TE's import error instead
#   nvidia-dali, mpi4py    the DALI wheel is 424 MB (over the 64 MiB a lent machine carries) and the check does not
#                          use --dataloader dali; MPI launch is not part of the check
#   setuptools             megatron-core imports torch.utils.cpp_extension, which imports setuptools; torch's own
#                          wheel requires setuptools, so it is there wherever torch was pip-installed
# (Checked on CPU: the check's steps 1-7 pass with kiwipiepy, zstandard, einops, boto3/botocore, dateutil, six,
# urllib3 and certifi all made unimportable; step 10 needs einops.)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PYTHON="${PYTHON:-python3}"
WHEELS=(megatron-core==0.16.1 packaging==25.0 einops==0.8.2)

mkdir -p "$DEST"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -n 1
