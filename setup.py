"""Builds relaykern and its C++ extension relaykern._C.

The extension owns the paged KV pools and block managers (csrc/). CUDA sources (csrc/*.cu) are compiled only
when a CUDA toolchain is wanted: torch sees a GPU or RELAYKERN_CUDA=1. Everything else is a CPU build, which is
what CI and the tests use.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

cpp_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
want_cuda = bool(cuda_sources) and (os.environ.get("RELAYKERN_CUDA") == "1" or torch.cuda.is_available())

if want_cuda:
    extension = CUDAExtension(
        "relaykern._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": ["-O3", "-DRELAYKERN_WITH_CUDA"], "nvcc": ["-O3"]},
    )
else:
    extension = CppExtension("relaykern._C", cpp_sources, extra_compile_args=["-O3"])

setup(
    packages=["relaykern", "relaykern.models", "relaykern.engine", "relaykern.train", "relaykern.eval",
              "relaykern.server", "relaykern.kernels", "relaykern.bench"],
    package_dir={"relaykern.kernels": "kernels", "relaykern.bench": "bench"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
