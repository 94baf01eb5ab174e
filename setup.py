"""Build script. Package metadata lives in pyproject.toml.

A plain ``pip install`` is pure Python and needs no compiler or CUDA toolkit: the native backend
(sources in ``csrc/``) is then built just in time on first use, or ahead of time with
``python -m fusedadapters.build``. Every install also copies ``csrc/`` into the package
(``fusedadapters/_csrc``), so that an installed wheel can build it.

``FUSEDADAPTERS_BUILD_NATIVE=1 pip install --no-build-isolation .`` (torch must be importable while
building) compiles the library into the package as ``fusedadapters/_native*.so``, for those who
package wheels; the native backend then loads it without compiling. It is built with
``$FUSEDADAPTERS_NATIVE_CFLAGS`` (default ``-O3 -ffp-contract=fast -fopenmp-simd``: no ``-march``, so
the wheel runs on any CPU of its architecture).
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
    """The ahead-of-time build of the native library (CPU kernels; CUDA kernels are not finished)."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = os.environ.get("FUSEDADAPTERS_NATIVE_CFLAGS", "-O3 -ffp-contract=fast -fopenmp-simd").split()
    extension = CppExtension(
        "fusedadapters._native",
        sources=[str(p.relative_to(HERE)) for p in (CSRC / "binding.cpp", CSRC / "linear_adapter_cpu.cpp")],
        include_dirs=[str(CSRC)],
        extra_compile_args=flags,
        py_limited_api=False,
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FUSEDADAPTERS_BUILD_NATIVE") == "1":
    ext_modules, extra_commands = native_extension()
    cmdclass.update(extra_commands)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
