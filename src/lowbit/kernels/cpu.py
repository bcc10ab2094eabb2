"""The weight-only quantized products on machines without the Triton kernels (CPU first).

Two paths, chosen per call by :func:`wna16_matmul_cpu`:

* **torch's CPU int4 kernel** (``torch._weight_int4pack_mm_for_cpu``, vectorized for AVX-512 /
  AVX2 and NEON) for 4- and 8-bit weights with bf16 or fp16 activations, group sizes that are multiples
  of 32 (larger groups and per-channel scales are repeated into groups of 256, 128, 64 or 32, exactly), ``N`` a multiple of 16. The
  weight is converted once from lowbit's layout into the kernel's and kept by the caller
  (:class:`CpuInt4Weight`: the codes plus 32 bits of scale and zero per group and
  plane, 4.25 bits a weight for 4-bit codes at group 128). It computes ``(c - 8) * scale + zf``
  with a float zero ``zf`` rounded to the activation dtype, in the activation dtype: within bf16
  tolerance of the reference, not bitwise equal to it. An 8-bit code ``q = 16 h + l`` runs as two
  4-bit planes summed in float32: ``(h - 8) * 16 s + zf_h`` plus ``(l - 8) * s + zf_l`` is ``(q - z) s``
  when ``zf_h + zf_l = (136 - z) s`` (``zf_h`` that sum rounded, ``zf_l`` the remainder).
* **dequantize, then one dense product** (:func:`dequantize_packed`) for everything else: float32
  activations (the int4 kernel has no vectorized float32 path: it was 7x slower than a
  dense float32 product; running float32 models in bf16 would change their numbers silently), other
  shapes. It works from the packed words in int32 (no int64 copies) and computes in float32, like
  :func:`lowbit.kernels.reference.wna16_matmul_reference`.

W8A8 int8 runs ``torch._int_mm`` on the CPU (:func:`w8a8_int8_mm_cpu`, bitwise the reference's output). FP8 W8A8
keeps the reference: torch's CPU ``_scaled_mm`` was slower than it (74 against 42 ms on a 2048 x 8192 product).

Measured on this project's 2-core CPU: ``bench/cpu_linear.py`` and ``bench/cpu_decode.py``
(bench/notes/kernels.md, "CPU").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.kernels import reference
from lowbit.kernels.layout import PackedWNA16, unpack_codes

# the group sizes torch's CPU int4 kernel takes, largest first (per-channel scales are repeated into the first
# one that divides K)
INT4_CPU_GROUPS = (256, 128, 64, 32)
INT4_CPU_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CpuInt4Weight:
    """A 4- or 8-bit weight in the layout of torch's CPU int4 kernel: one 4-bit plane per four bits of code.

    Attributes:
        planes: per plane, uint8 ``[N, K / 2]`` from ``torch._convert_weight_to_int4pack_for_cpu`` (the high
            nibbles first).
        scales_and_zeros: per plane, ``[K / group_size, N, 2]`` in the activation dtype: the plane's scale and float
            zero (``(8 - zero) * scale`` for a 4-bit weight).
        group_size: input features per scale (32, 64, 128 or 256).
        out_features: N.
    """

    planes: tuple[Tensor, ...]
    scales_and_zeros: tuple[Tensor, ...]
    group_size: int
    out_features: int


def _int4_group_size(packed: PackedWNA16) -> int | None:
    """The kernel's group size: the stored one, or the largest kernel size dividing it (its scales repeated)."""
    stored = packed.in_features if packed.group_size == -1 else packed.group_size
    return next((g for g in INT4_CPU_GROUPS if stored % g == 0), None)


def _weight_refusal(packed: PackedWNA16) -> str | None:
    """Why the weight itself does not fit torch's CPU int4 kernel, or ``None``."""
    if packed.bits not in (4, 8):
        return f"{packed.bits}-bit codes (4- and 8-bit ones run on the kernel)"
    if packed.out_features % 16:
        return f"out_features {packed.out_features} is not a multiple of 16"
    if _int4_group_size(packed) is None:
        return f"group_size {packed.group_size} (the kernel takes multiples of 32, or per-channel with K % 32 == 0)"
    return None


def int4_cpu_refusal(packed: PackedWNA16, x: Tensor) -> str | None:
    """Why torch's CPU int4 kernel cannot take this product, or ``None`` when it can."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if x.device.type != "cpu":
        return f"the activations are on {x.device.type}, not the CPU"
    if x.dtype not in INT4_CPU_DTYPES:
        return f"{x.dtype} activations (the kernel is fast for bfloat16 and float16 only: load the model in bfloat16)"
    return _weight_refusal(packed)


def dequantize_packed(packed: PackedWNA16, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight ``(q - zero) * scale`` ``[N, K]`` in ``dtype``, straight from the kernel layout.

    The same numbers as ``reference.dequantize_weight(*unpack_wna16(packed), bits)`` (for float32), in fewer passes.
    """
    bits, n, k = packed.bits, packed.out_features, packed.in_features
    codes = unpack_codes(packed)
    group = k if packed.group_size == -1 else packed.group_size
    groups = k // group
    scale = packed.scale[:groups].t().to(dtype)  # [N, G]
    zero = (
        torch.full((), 2 ** (bits - 1), dtype=dtype, device=codes.device)
        if packed.zero is None
        else packed.zero[:groups].t().to(dtype)[..., None]
    )
    weight = codes.to(dtype).reshape(n, groups, group)
    return ((weight - zero) * scale[..., None]).reshape(n, k)


def prepare_int4_cpu(packed: PackedWNA16, dtype: torch.dtype) -> CpuInt4Weight:
    """Convert a 4- or 8-bit weight from lowbit's layout into torch's CPU int4 kernel's (see
    :func:`int4_cpu_refusal`)."""
    refusal = _weight_refusal(packed)
    if refusal is not None:
        raise ValueError(f"torch's CPU int4 kernel cannot take this weight: {refusal}; use the dequantizing path "
                         "(dequantize_packed)")  # fmt: skip
    group_size = _int4_group_size(packed)
    k = packed.in_features
    stored_group = k if packed.group_size == -1 else packed.group_size
    scale = packed.scale[: k // stored_group].float()  # [G, N]
    half = 2 ** (packed.bits - 1)
    zero = torch.full_like(scale, half) if packed.zero is None else packed.zero[: k // stored_group].float()
    codes = unpack_codes(packed)
    if packed.bits == 4:
        nibbles = [codes]
        scales_and_zeros = [(scale, (8.0 - zero) * scale)]
    else:  # q = 16 h + l: (h - 8) 16 s + zf_h  +  (l - 8) s + zf_l  =  (q - z) s  when  zf_h + zf_l = (136 - z) s
        nibbles = [codes >> 4, codes & 15]
        # The whole float zero goes to the high plane, rounded to the activation dtype, and plane l takes the small
        # rounding remainder. Each plane is then centred like the weight: splitting it as (128 - z) s and 8 s made
        # two large opposite outputs (about 8 s * sum(x) each), rounded apart, 5-15x over bf16 tolerance for
        # activations that do not average to zero (ReLU / GELU outputs).
        float_zero = (136.0 - zero) * scale
        high = float_zero.to(dtype).float()
        scales_and_zeros = [(16.0 * scale, high), (scale, float_zero - high)]
    repeat = stored_group // group_size
    return CpuInt4Weight(
        tuple(torch._convert_weight_to_int4pack_for_cpu(c.contiguous(), 1) for c in nibbles),
        tuple(torch.stack(sz, -1).repeat_interleave(repeat, 0).to(dtype).contiguous() for sz in scales_and_zeros),
        group_size,
        packed.out_features,
    )


def int4_mm_cpu(x: Tensor, weight: CpuInt4Weight) -> Tensor:
    """``x @ W.T`` with torch's CPU int4 kernel; ``x`` ``[..., K]`` in the weight's prepared dtype. Two planes
    (8-bit codes) are summed in float32."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    parts = [
        torch._weight_int4pack_mm_for_cpu(rows, plane, weight.group_size, scales_and_zeros)
        for plane, scales_and_zeros in zip(weight.planes, weight.scales_and_zeros, strict=True)
    ]
    y = parts[0] if len(parts) == 1 else (parts[0].float() + parts[1].float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.out_features)


def wna16_matmul_cpu(x: Tensor, packed: PackedWNA16, int4: CpuInt4Weight | None = None) -> Tensor:
    """``x @ dequant(W).T`` (no bias) without Triton: the int4 kernel when ``int4`` is given (prepared for
    ``x.dtype``), else dequantize and one float32 product, output in ``x.dtype``."""
    if int4 is not None:
        return int4_mm_cpu(x, int4)
    weight = dequantize_packed(packed, torch.float32)
    return (x.float() @ weight.T).to(x.dtype)


def w8a8_int8_mm_cpu(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """W8A8 int8 without Triton: the activations quantized per token exactly as the reference does, the product in
    int32 by ``torch._int_mm`` (exact, so bitwise the reference's output), scaled after. ``x`` ``[..., K]``,
    ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]``."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = reference.quantize_per_token(rows, torch.int8)
    acc = torch._int_mm(xq, weight.t())
    y = (acc.float() * x_scale * weight_scale.float().reshape(1, -1)).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
