#!/usr/bin/env python
"""Thin wrapper: see hcx_megatron/data/preprocess_cli.py."""
import sys

from hcx_megatron.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main())
