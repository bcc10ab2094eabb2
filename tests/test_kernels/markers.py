"""Markers shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

# Tests that hand CPU tensors to Triton kernels: on a machine without a GPU tests/conftest.py sets TRITON_INTERPRET=1
# and Triton's interpreter runs them; with a GPU Triton compiles for it and refuses CPU pointers, so they are skipped
# there and the compiled kernels are covered by the files' test_gpu_* tests (and the device-aware tests that move
# their tensors to "cuda"). Found by running tests/test_kernels on an H200 in session 18 (bench/notes/kernels.md).
INTERPRETER_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU tensors through Triton's interpreter (no GPU); with a GPU the test_gpu_* tests run the compiled kernels",
)
