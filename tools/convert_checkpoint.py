"""Megatron dist checkpoints <-> Hugging Face Llama format. See docs/convert.md.

    python tools/convert_checkpoint.py to-hf --load CKPT_DIR --save HF_DIR [--tokenizer-model DIR] [--verify]
    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR \
        --target-tensor-parallel-size N --target-pipeline-parallel-size M
"""

from hcx_megatron.convert.cli import main

if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    raise SystemExit(main())
