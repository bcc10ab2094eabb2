"""Launching a compiled Triton kernel with less host time per call.

``kernel[grid](*args, **constexprs)`` binds every argument, computes the specialization key and
looks the compiled kernel up on each call: tens of microseconds of Python, as long as a small
W4A16 product runs on the GPU. When the host is slower than the GPU, that time shows up as idle
GPU between kernels (in eager decoding, and in ``triton.testing.do_bench``, whose timed region
starts when the GPU finishes the L2 flush, not when Python calls the kernel). :func:`launch`
remembers the compiled kernel per specialization after the first call and then calls its
launcher directly. Our own key holds everything Triton specializes on (each tensor's dtype and
16-byte alignment, each integer's ``== 1`` and divisibility by 16, the constexprs), so the
kernel it finds is the one Triton would have chosen.

Falls back to the plain launch on the interpreter, while a launch hook is set (profilers), and
for good once a direct launch fails (another Triton version's launcher signature), with a warning.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_COMPILED: dict[tuple, tuple] = {}
_ENABLED = [os.environ.get("LOWBIT_FAST_LAUNCH", "1") != "0"]


def set_fast_launch(enabled: bool) -> None:
    """Turn the direct launch on (default) or off (every call goes through ``kernel[grid]``)."""
    _ENABLED[0] = enabled


def _spec(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0)
    return (type(a), a)


def launch(kernel, grid: tuple, args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)``; ``args`` are the runtime arguments, in signature order, first."""
    if not _ENABLED[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or _hooked():
        kernel[grid](*args, **constexprs)
        return
    key = (kernel, *constexprs.values(), *map(_spec, args))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        if hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
            tail = tuple(constexprs[name] for name in kernel.arg_names[len(args) :])
            _COMPILED[key] = (compiled, tail)
        return
    compiled, tail = entry
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    try:
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *tail)  # fmt: skip
    except (TypeError, ValueError, AttributeError) as exc:  # the launcher's signature differs in this Triton
        logger.warning("direct Triton launch failed (%s); using kernel[grid] from now on", exc)
        _ENABLED[0] = False
        kernel[grid](*args, **constexprs)


def _hooked() -> bool:
    try:
        from triton import knobs
    except ImportError:  # older Triton: no knobs, no hooks to honour here
        return False
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None
