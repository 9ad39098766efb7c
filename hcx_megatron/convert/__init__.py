"""Megatron torch_dist checkpoints <-> Hugging Face Llama (see docs/convert.md).

Modules: layout (tensor mappings), hf_config (config.json <-> ModelConfig), dist_reader (streaming torch_dist
reads), hf_writer (sharded safetensors), export (to-hf), importer (from-hf), tokenizer_export, verify,
mcore_runtime / mcore_forward (megatron on CPU for checks), cli (hcx-convert-checkpoint).
"""
