"""Build script for mat_kernels.

The Python package (Triton kernels, PyTorch reference and fallbacks) needs no compilation. The C++/CUDA
extension ``mat_kernels._C`` (sparse-update backward) is built here once its sources exist in ``csrc/``;
until then the package installs as pure Python and ``python -m mat_kernels`` says the extension is absent.
Build with ``pip install --no-build-isolation -e .`` so the installed torch is used.
"""
import glob
import os

from setuptools import setup


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        print("mat_kernels: no C++ sources in csrc/, building the pure-Python package")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("mat_kernels._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
