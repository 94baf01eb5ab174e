"""Build script. Package metadata lives in pyproject.toml.

A plain ``pip install`` is pure Python and needs no compiler or CUDA toolkit: the native backend
(sources in ``csrc/``) is then built just in time on first use, or ahead of time with
``python -m fusedadapters.build``. Every install also copies ``csrc/`` into the package
(``fusedadapters/_csrc``), so that an installed wheel can build it.

``FUSEDADAPTERS_BUILD_NATIVE=1 pip install --no-build-isolation .`` (torch must be importable while
building) compiles the library into the package as ``fusedadapters/_native*.so``, for those who
package wheels; the native backend then loads it without compiling. It is built with
``$FUSEDADAPTERS_NATIVE_CFLAGS`` (default ``-O3 -ffp-contract=fast -fopenmp-simd``: no ``-march``, so
the wheel runs on any CPU of its architecture). With a CUDA build of torch and the CUDA toolkit, the
CUDA kernels join it, compiled for ``$TORCH_CUDA_ARCH_LIST`` (``FUSEDADAPTERS_NATIVE_CUDA=0`` leaves
them out).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


class BuildPyWithSources(build_py):
    """Copies the C++ sources into the package, where ``fusedadapters.ops.native`` looks for them."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fusedadapters" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in CSRC.iterdir():
            if source.suffix in (".h", ".cpp", ".cu"):
                shutil.copy2(source, target / source.name)


def native_extension():
    """The ahead-of-time build of the native library: CPU kernels, and CUDA kernels where torch and the
    toolkit allow (the same rule as the just-in-time build)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flags = os.environ.get("FUSEDADAPTERS_NATIVE_CFLAGS", "-O3 -ffp-contract=fast -fopenmp-simd").split()
    sources = [CSRC / "binding.cpp", CSRC / "linear_adapter_cpu.cpp"]
    cuda = (torch.version.cuda is not None and CUDA_HOME is not None
            and os.environ.get("FUSEDADAPTERS_NATIVE_CUDA", "1") != "0")
    kind, extra = CppExtension, {"cxx": flags}
    if cuda:
        sources += sorted(CSRC.glob("*.cu"))
        kind, extra = CUDAExtension, {"cxx": flags + ["-DFA_WITH_CUDA"], "nvcc": ["-O3", "-DFA_WITH_CUDA"]}
    extension = kind(
        "fusedadapters._native",
        sources=[str(p.relative_to(HERE)) for p in sources],
        include_dirs=[str(CSRC)],
        extra_compile_args=extra,
        py_limited_api=False,
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FUSEDADAPTERS_BUILD_NATIVE") == "1":
    ext_modules, extra_commands = native_extension()
    cmdclass.update(extra_commands)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
