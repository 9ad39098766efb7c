#!/usr/bin/env python3
"""Scaling sweeps: generate (Slurm job array), run-local (torchrun on CPU), report (table + PNGs).
See docs/perf.md. Logic lives in hcx_megatron.perf.study_cli."""

import sys

from hcx_megatron.perf.study_cli import main

if __name__ == "__main__":
    sys.exit(main())
