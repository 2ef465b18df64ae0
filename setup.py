"""Build script for mat_kernels: the Python package plus the extension ``mat_kernels._C``.

``mat_kernels._C`` holds the sparse-update backward ops (``torch.ops.mat_kernels.sparse_*``):

* C++ (``csrc/*.cpp``) is always built: op schemas and the CPU implementation.
* CUDA (``csrc/cuda/*.cu``) is added when torch is a CUDA build and a CUDA toolkit is found (``CUDA_HOME`` /
  ``CUDA_PATH``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``). A visible GPU is not needed.

Environment overrides:

* ``MAT_KERNELS_USE_CUDA=0``: CPU only, even with a CUDA torch and toolkit.
* ``MAT_KERNELS_USE_CUDA=1`` or ``FORCE_CUDA=1``: CUDA is required; the build fails, saying why, if impossible.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures (default here: ``9.0`` (H100) plus those of visible GPUs);
  setting it also asks for CUDA, but a CPU torch only gets a warning.
* ``MAX_JOBS``: parallel compile jobs (ninja).

The build prints which devices it targets and, when CUDA is skipped, why. Build against the installed torch:
``pip install --no-build-isolation .`` or, in place, ``python setup.py build_ext --inplace``.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = ["9.0"]


def _say(msg: str) -> None:
    print(f"mat_kernels setup: {msg}", flush=True)


def _env_flag(name: str):
    """True/False for 1/0-like values of an environment variable, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"mat_kernels setup: {name}={os.environ[name]!r} is not 0 or 1")


def _find_cuda_toolkit():
    """Path of a CUDA toolkit with bin/nvcc, or None. Order: CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _cuda_decision(torch):
    """(build_cuda, reason) from the torch build, the toolkit and the environment overrides."""
    use = _env_flag("MAT_KERNELS_USE_CUDA")
    forced = use is True or _env_flag("FORCE_CUDA") is True
    requested = bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if use is False:
        return False, "disabled by MAT_KERNELS_USE_CUDA=0"
    toolkit = _find_cuda_toolkit()
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
        if toolkit:
            why += f"; the CUDA toolkit at {toolkit} is not used"
    elif toolkit is None:
        why = "no CUDA toolkit found (CUDA_HOME/CUDA_PATH unset, no /usr/local/cuda, no nvcc on PATH)"
    else:
        os.environ.setdefault("CUDA_HOME", toolkit)
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and the toolkit at {toolkit}"
    if forced:
        sys.exit(f"mat_kernels setup: CUDA was required (MAT_KERNELS_USE_CUDA=1 or FORCE_CUDA=1) but {why}")
    if requested:
        _say(f"warning: TORCH_CUDA_ARCH_LIST is set but {why}")
    return False, why


def _default_cuda_archs(torch) -> None:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    archs = set(DEFAULT_CUDA_ARCHS)
    try:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}")
    except Exception:  # no driver on a build machine: the default list is enough
        pass
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted(archs))


def _extensions():
    try:
        import torch
    except ImportError:
        sys.exit(
            "mat_kernels setup: torch must be installed first (the extension is compiled against it); build with "
            "`pip install --no-build-isolation .` so the installed torch is used"
        )
    cpp = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
    cu = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    headers = sorted(glob.glob("csrc/**/*.h", root_dir=ROOT, recursive=True))
    build_cuda, reason = _cuda_decision(torch)
    if build_cuda:
        _default_cuda_archs(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3"]
    if build_cuda:
        _say(f"building mat_kernels._C for CPU and CUDA: {reason}; TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "mat_kernels._C",
            cpp + cu,
            depends=headers,
            define_macros=[("MAT_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    else:
        _say(f"building mat_kernels._C for CPU only; CUDA skipped: {reason}")
        ext = CppExtension("mat_kernels._C", cpp, depends=headers, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
