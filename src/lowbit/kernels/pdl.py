"""Programmatic dependent launch (PDL, Hopper and later) for lowbit's decode kernels.

A decode step is a chain of short kernels, each waiting for the one before. With PDL a kernel is launched
before its predecessor has finished: its programs call ``griddepcontrol.launch_dependents`` first (so the
next kernel may start too), do the work that does not depend on the predecessor (the W4A16 kernels ask
the L2 for their first weight blocks, :func:`lowbit.kernels.wna16_jit.pdl_prologue`), then
``griddepcontrol.wait`` until the predecessor has completed and its writes are visible. Every read of
an activation and every write comes after the wait. A kernel that is not launched this way (PyTorch's
or Inductor's) still waits for the whole of its predecessor, so only chains of lowbit kernels overlap:
all of a step's launches with ``runtime.FUSE`` on, the attention and the output projection without it.

``PDL[0]``: ``"off"`` (default), ``"early"`` (each program lets the next kernel launch as it starts) or
``"late"`` (after its main loop), used where :func:`supported`; ``PREFETCH_BLOCKS[0]``: how many K-blocks of
128 features each program prefetches before the wait (0: none, only the early launch). ``"attention"`` (session 21,
not measured yet): only the decode attention is launched this way, after q/k/v's GEMV, which lets it launch as that
GEMV starts (the CUDA GEMVs' ``griddepcontrol.launch_dependents``); before its wait the attention reads the
position and the rotary rows and asks the L2 for its slice of the cache, none of which the GEMV writes. It
applies to the Triton attention only: with ``attention.ROPE_LAUNCH["kernel"] = "cuda"`` the mode changes nothing,
and caches whose rows are not 16-byte aligned launch without it.
bench/decode_profile.py ``--pdl off early late`` measures them in one call (bench/notes/kernels.md, session 10).

Off by default because it did not pay on the H200 (Llama-3-8B-shaped W4A16 step, batch 1): ``"early"`` made the
step slower (2.437 -> 2.554 ms without prefetch, 3.539 ms with whole-range prefetch: the early programs and
their prefetches compete with the running kernel for the memory system); ``"late"`` was within noise without
``FUSE`` (2.443 -> 2.438 ms) and recovered most of ``FUSE``'s loss (2.559 -> 2.470 ms) without beating the
unfused step. It stays as an option, tested for exactness (tests/test_kernels/test_runtime.py).
"""

from __future__ import annotations

import functools

import torch
import triton

try:  # the device functions, for the kernels (only traced when their PDL constexpr is set)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton without grid dependency control: supported() is False
    gdc_launch_dependents = gdc_wait = None

PDL = ["off"]
PREFETCH_BLOCKS = [0]  # whole-range prefetch (128) measured worst, 3.539 ms against 2.437 ms
MODES = {"early": 1, "late": 2}  # the kernels' PDL constexpr
ATTENTION_MODE = 3  # the decode attention's PDL constexpr in mode "attention"


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return gdc_wait is not None and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def supported(device: torch.device) -> bool:
    """Whether launches on ``device`` may use PDL: CUDA, compute capability 9.0 or later, a Triton with it."""
    if device.type != "cuda" or not _triton_has_pdl():
        return False
    return _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device, blocks_per_program: int = 0, attention: bool = False) -> dict:
    """Extra launch arguments of a PDL-aware kernel: ``PDL``, ``PF_BLOCKS`` (W4A16 kernels, when
    ``blocks_per_program`` is given) and Triton's ``launch_pdl``; empty when PDL is off or unsupported. In mode
    ``"attention"`` only the decode attention (``attention``) gets them."""
    if PDL[0] == "attention" and supported(device):
        return {"PDL": ATTENTION_MODE, "launch_pdl": True} if attention else {}
    if PDL[0] not in MODES or not supported(device):
        return {}
    options: dict = {"PDL": MODES[PDL[0]], "launch_pdl": True}
    if blocks_per_program:
        cap = PREFETCH_BLOCKS[0]
        # a power of two (tl.arange); the blocks past the program's range are masked off in the kernel
        options["PF_BLOCKS"] = 0 if cap <= 0 else triton.next_power_of_2(min(cap, blocks_per_program))
    return options
