#!/usr/bin/env python3
"""Rank parallel layouts by predicted throughput (same as the `hcx-plan-layout` console script).
See docs/perf.md. Logic lives in hcx_megatron.perf.plan_cli."""

import sys

from hcx_megatron.perf.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
