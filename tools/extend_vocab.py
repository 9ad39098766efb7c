#!/usr/bin/env python
"""Thin wrapper: see hcx_megatron/tokenizer/extend_cli.py."""
import sys

from hcx_megatron.tokenizer.extend_cli import main

if __name__ == "__main__":
    sys.exit(main())
