"""megatron_rl_agg: exact, layout-independent policy-gradient loss aggregation for Megatron-Core RL."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="megatron_rl_agg",
    version="0.1.0",
    description="Exact, configurable policy-gradient loss aggregation for RL on Megatron-Core "
                "(GRPO, DAPO, Dr. GRPO, PPO) at any TP/PP/DP layout",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rl_agg", "megatron_rl_agg.*"]),
    package_data={"megatron_rl_agg": ["py.typed"]},
    # CI pins torch==2.13.0 (CPU build) and runs the suite on megatron-core 0.16.1 and 0.19.2 (the
    # newest; scripts/test_compat.sh); install torch first so pip never resolves a CUDA build on a CPU
    # machine (see README). The megatron-core upper bound is the first release not tested: an
    # environment with any tested release keeps it (pip never downgrades it to satisfy this package).
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.13,<0.20",
        "numpy",
        "packaging",
        "psutil",  # megatron-core's torch_dist checkpoint save needs it
        "pyyaml>=6",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7", "tensorboard>=2.14"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        # GPU only: Transformer Engine layer spec and fused kernels. NVIDIA apex is optional too but is
        # installed from source (see docs/training.md, GPU installation); neither is ever imported
        # unconditionally.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Hugging Face checkpoints in and out, tokenizers and chat templates, text prompt files
        # (JSONL; Parquet through pyarrow), the math_verify reward (megatron_rl_agg.hf).
        "hf": ["transformers>=4.51", "safetensors>=0.4", "tokenizers>=0.21", "math-verify>=0.7",
               "pyarrow>=14"],
    },
    entry_points={"console_scripts": ["megatron-rl-agg=megatron_rl_agg.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
