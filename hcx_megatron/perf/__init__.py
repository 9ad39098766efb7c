"""Performance model: FLOPs, memory per GPU, step time, layout planner, calibration, sweep tools.

`model_flops_per_token(model_cfg, seq_length)` is the MFU numerator used by training metrics.
"""

from hcx_megatron.perf.flops import (  # noqa: F401
    hardware_flops_per_token,
    mfu,
    model_flops_per_step,
    model_flops_per_token,
    model_tflop_per_step,
    tflops_per_gpu,
)
