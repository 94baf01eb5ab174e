"""Test-wide setup: without CUDA, Triton kernels run on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
