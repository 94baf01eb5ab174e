"""Build script. Package metadata lives in pyproject.toml.

The CUDA C++ extension (sources in ``csrc/``) is added here once its kernels exist; until then the
package is pure Python and installs without a CUDA toolkit.
"""

from setuptools import setup

setup()
