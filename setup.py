from setuptools import find_packages, setup

setup(
    name="hcx_megatron",
    version="0.1.0",
    description="Training system for HyperCLOVA X-style decoders on megatron-core (3D parallel, SFT, RLHF, HF export)",
    packages=find_packages(include=["hcx_megatron", "hcx_megatron.*", "launch", "launch.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned here: clusters bring their own CUDA build (NGC); CPU dev pins it in
        # requirements-dev.txt. 2.5 is the first with scaled_dot_product_attention(enable_gqa=...), which the
        # local spec's SDPAAttention passes.
        "torch>=2.5",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        "psutil",  # dist_checkpointing's async writer
        "tqdm",
        "tensorboard",
        "tokenizers>=0.19",
        "regex",  # preprocessing's fast encoder splits words with the same pattern tokenizers uses
        "einops",  # megatron-core's Megatron-FSDP (--use-megatron-fsdp) builds its device mesh with it
        "sentencepiece",
        "kiwipiepy>=0.20",
        "safetensors",
        "zstandard",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120"],
        # --dataloader dali. The CUDA 12 wheel also runs CPU-only pipelines, so CI installs it and tests DALI
        # (a 424 MB download, ~1.1 GB installed).
        "dali": ["nvidia-dali-cuda120"],
        "mpi": ["mpi4py"],
        "hf": ["transformers>=4.40"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.40", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "hcx-pretrain=hcx_megatron.pretrain:main",
            "hcx-sft=hcx_megatron.sft:main",
            "hcx-reward=hcx_megatron.rlhf.reward:main",
            "hcx-ppo=hcx_megatron.rlhf.ppo:main",
            "hcx-train-tokenizer=hcx_megatron.tokenizer.cli:main",
            "hcx-preprocess-data=hcx_megatron.data.preprocess_cli:main",
            "hcx-convert-checkpoint=hcx_megatron.convert.cli:main",
            "hcx-chat=hcx_megatron.inference.chat:main",
            "hcx-plan-layout=hcx_megatron.perf.plan_cli:main",
        ]
    },
)
