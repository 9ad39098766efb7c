"""The one rule for how long a sequence must be for a given layout, used by every driver and by generation.

A batch's sequence length (tokens per row, after padding) must be a multiple of `sequence_multiple(...)`:
- sequence parallelism splits the sequence over the TP ranks: a multiple of TP;
- context parallelism cuts it into 2*CP chunks (load-balanced causal split, see megatron-core's
  `get_batch_on_this_cp_rank`): a multiple of 2*CP;
- FP8 GEMMs in Transformer Engine assert that the leading dimension of their input (the tokens this rank
  holds, before the sequence-parallel all-gather) is a multiple of 8, and the weight's inner dimension a multiple
  of 16; we ask for 16 tokens per rank so that any micro-batch size and either check pass:
  a multiple of 16 * (TP if SP) * CP.
"""

from __future__ import annotations

import math

FP8_TOKEN_MULTIPLE = 16


def sequence_multiple(tensor_parallel: int = 1, sequence_parallel: bool = False, context_parallel: int = 1,
                      fp8: bool = False) -> int:
    """Smallest length every padded sequence must be a multiple of under this layout (see the module doc)."""
    split = (tensor_parallel if sequence_parallel and tensor_parallel > 1 else 1) * context_parallel
    multiple = math.lcm(split, context_parallel_chunks(context_parallel))
    if fp8:
        multiple = math.lcm(multiple, FP8_TOKEN_MULTIPLE * split)
    return multiple


def context_parallel_chunks(context_parallel: int) -> int:
    """How many equal chunks context parallelism cuts a sequence into (2*CP, two per rank: see the module doc;
    1 without CP). Each document of a packed THD batch is cut the same way, so it is padded to this multiple."""
    return 2 * context_parallel if context_parallel > 1 else 1


def sequence_multiple_for(cfg) -> int:
    """The rule for a run's Config (hcx_megatron.config.args.Config)."""
    p = cfg.parallel
    return sequence_multiple(p.tensor_model_parallel_size, p.sequence_parallel, p.context_parallel_size,
                             bool(cfg.runtime.fp8_format))


def sequence_multiple_of_model(tconfig) -> int:
    """The rule for a built model, from its megatron TransformerConfig (generation has only the model)."""
    return sequence_multiple(tconfig.tensor_model_parallel_size, bool(tconfig.sequence_parallel),
                             tconfig.context_parallel_size, bool(getattr(tconfig, "fp8", None)))


def pad_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-int(length) // int(multiple)) * int(multiple)


__all__ = ["sequence_multiple", "sequence_multiple_for", "context_parallel_chunks", "sequence_multiple_of_model",
           "pad_length", "FP8_TOKEN_MULTIPLE"]
