"""hcx_megatron: training system for HyperCLOVA X-style decoders on megatron-core."""

__version__ = "0.1.0"
