#!/usr/bin/env bash
# System packages the test suite needs (Debian): filled in by the Slurm/MPI work.
set -euo pipefail
exit 0
