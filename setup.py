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
    package_data={"megatron_mel": ["**/*.txt", "**/*.jinja", "**/*.md"]},
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
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "triton>=3.0"],
        # Cluster only: none of these installs or imports on a CPU machine.
        "gpu": [
            "sglang[srt]>=0.5",
            "vllm>=0.11",
            "transformer-engine[pytorch]>=2.0",
            # NVIDIA apex is not on PyPI (the PyPI "apex" is another project); NGC containers
            # ship it, elsewhere build it from source with its CUDA extensions.
            "apex @ git+https://github.com/NVIDIA/apex.git",
        ],
    },
    entry_points={"console_scripts": ["megatron-mel=megatron_mel.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
