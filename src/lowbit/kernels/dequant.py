"""Dequantization building blocks shared by the W4A16 / W8A16 kernels.

* :func:`code_values` / :func:`dequant_slab`: one code slab of the interleaved layout
  (:mod:`lowbit.kernels.layout`) as float32, without int-to-float conversions: the code is ORed
  into the mantissa of 2**23 and one subtraction of ``2**23 + zero`` leaves ``q - zero`` exactly
  (the "magic number" trick, Kim et al. 2022, "Who says elephants can't run",
  https://arxiv.org/abs/2211.10017).
* :func:`word_dot_bf16x2`: the GEMV dot product of a 4-bit word with its eight activations in
  packed bf16x2 inline PTX (GPU only, sm_90). A Triton kernel computes one value per
  instruction, about five instructions per weight; here two codes are converted at once
  (``(w >> 4j) & 0x000F000F | 0x43004300`` reads as the pair ``128 + q``, as FasterTransformer's
  ``lop3``-based int4 conversion does), the zero point is removed exactly with one packed FMA,
  and the products accumulate in packed bf16 over the four pairs of a word before one
  conversion to float32: about 2.6 instructions per weight. The bf16 products round to 8
  significant bits (relative error about 3e-3 on a layer output, within bf16 tolerance).
* :func:`magic_codes`: the codes of 4-bit words as ``128 + q`` (bf16) or ``1024 + q`` (fp16) in one instruction
  per weight, for a tensor-core product at M = 1..16 that subtracts the offset and zero point afterwards.
* :func:`dequantize_packed`: the dense weight, for large M where cuBLAS does the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import BLOCK_K, PackedWNA16

_WORD_DOT_PTX = tl.constexpr(
    """
{
.reg .b32 a, d, p, t, one, zero;
.reg .b16 lo, hi;
.reg .f32 flo, fhi, fsum;
mov.b32 one, 0x3F803F80;
mov.b32 zero, 0;
lop3.b32 a, $1, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 d, a, one, $6;
fma.rn.bf16x2 p, d, $2, zero;
shr.u32 t, $1, 4;
lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 d, a, one, $6;
fma.rn.bf16x2 p, d, $3, p;
shr.u32 t, $1, 8;
lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 d, a, one, $6;
fma.rn.bf16x2 p, d, $4, p;
shr.u32 t, $1, 12;
lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 d, a, one, $6;
fma.rn.bf16x2 p, d, $5, p;
mov.b32 {lo, hi}, p;
cvt.f32.bf16 flo, lo;
cvt.f32.bf16 fhi, hi;
add.f32 fsum, flo, fhi;
mov.b32 $0, fsum;
}
"""
)


def _dequant_word_ptx() -> str:
    """PTX for :func:`dequant_words_bf16x2`: two words in (``$8``, ``$9``), their 8 code slabs out as bf16 pairs.

    Byte ``k`` of each word holds codes ``2k`` (low nibble) and ``2k + 1``. One ``prmt`` puts byte
    ``k`` of the first word in the low half and of the second in the high half, then per code:
    ``lop3`` (mask, OR the exponent of 128: the pair reads ``128 + q``), one packed FMA adding
    ``-(128 + zero)`` (exact: small integers), one packed FMA by the scale (one rounding, as
    the float32 reference rounds once). Two instructions per weight plus a quarter each for
    ``prmt`` and ``shr``, against about five for the float32 magic-number route.
    """
    return _byte_pair_ptx(
        0x43004300,
        [".reg .b32 a, d, one, mz;", "mov.b32 one, 0x3F803F80;", "mov.b32 mz, 0x80008000;"],
        lambda c: ("a", ["fma.rn.bf16x2 d, a, one, $10;", f"fma.rn.bf16x2 ${c}, d, $11, mz;"]),
    )


def _byte_pair_ptx(magic: int, header: list[str], per_code) -> str:
    """The loop both PTX routines share: for byte ``k`` of two words (``$8``, ``$9``), one ``prmt`` pairs them,
    and codes ``2k`` (low nibbles) and ``2k + 1`` (after one shift) each get one ``lop3`` that masks them and ORs
    in ``magic``. ``per_code(c)`` gives the ``lop3``'s destination and the lines that follow it for code ``c``."""
    lines = ["{", ".reg .b32 t, u;", *header]
    for k in range(4):
        sel = (4 + k) << 12 | (4 + k) << 8 | k << 4 | k
        lines.append(f"prmt.b32 t, $8, $9, {sel:#06x};")
        for half, src in ((0, "t"), (1, "u")):
            if half:
                lines.append("shr.u32 u, t, 4;")
            dst, after = per_code(2 * k + half)
            lines += [f"lop3.b32 {dst}, {src}, 0x000F000F, {magic:#010x}, 0xEA;", *after]
    lines.append("}")
    return "\n".join(lines)


_DEQUANT_WORD_PTX = tl.constexpr(_dequant_word_ptx())


@triton.jit
def dequant_words_bf16x2(words, neg_zero, scale):
    """The eight code slabs of 4-bit words as bf16, ``(q_j - zero) * scale`` for ``j = 0..7`` (GPU only).

    ``words`` int32; ``neg_zero`` (``-(128 + zero)``) and ``scale`` bf16, all of one shape (broadcast
    first). Returns a tuple of eight bf16 tensors of that shape: slab ``j`` holds code ``j`` of
    every word (input feature ``j * WORDS + w`` of the layout). Zeros must be integers (exact in
    bf16 as ``128 + zero``), as they are for every integer format lowbit packs.
    """
    return tl.inline_asm_elementwise(
        _DEQUANT_WORD_PTX,
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
        [words, neg_zero, scale],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=2,
    )


def _magic_codes_ptx(magic: int) -> str:
    """PTX for :func:`magic_codes`: two words in (``$8``, ``$9``), their 8 code slabs out as pairs of ``OFFSET + q``.

    Per byte ``k``: one ``prmt`` puts byte ``k`` of the first word in the low half and of the second in the
    high half, one ``lop3`` masks the low nibbles and ORs in the exponent (code ``2k``), one shift and one
    ``lop3`` the high nibbles (code ``2k + 1``): one instruction per weight, no arithmetic.
    """
    return _byte_pair_ptx(magic, [], lambda c: (f"${c}", []))


_MAGIC_CODES_BF16_PTX = tl.constexpr(_magic_codes_ptx(0x43004300))  # bf16 128 + q: exponent of 128, ulp 1
_MAGIC_CODES_FP16_PTX = tl.constexpr(_magic_codes_ptx(0x64006400))  # fp16 1024 + q: exponent of 1024, ulp 1


@triton.jit
def magic_codes(words, dtype: tl.constexpr):
    """The eight code slabs of 4-bit words as ``OFFSET + q`` in ``dtype``, exact (GPU only).

    ``OFFSET`` is 128 for bf16 and 1024 for fp16 (:func:`magic_offset`): the code ORed into the mantissa of
    ``OFFSET``, whose unit in the last place is 1. Returns a tuple of eight tensors shaped like ``words``:
    slab ``j`` holds code ``j`` of every word (input feature ``j * WORDS + w`` of the layout). The zero
    point is not removed here: a tensor-core product accumulates in float32, where subtracting
    ``(OFFSET + zero) * sum(x)`` afterwards is exact enough (:func:`lowbit.kernels.wna16_jit.w4_mma_kernel`).
    """
    if dtype == tl.float16:
        return tl.inline_asm_elementwise(_MAGIC_CODES_FP16_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=2)  # fmt: skip
    else:
        return tl.inline_asm_elementwise(_MAGIC_CODES_BF16_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)  # fmt: skip


@triton.jit
def magic_offset(dtype: tl.constexpr):
    """The offset :func:`magic_codes` adds to every code in ``dtype``: 128 (bf16) or 1024 (fp16)."""
    if dtype == tl.float16:
        return 1024.0
    else:
        return 128.0


@triton.jit
def pack_bf16x2(low, high):
    """Two bf16 tensors as one int32 tensor holding ``(low, high)`` pairs."""
    lo = low.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = high.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def word_dot_bf16x2(words, x04, x15, x26, x37, neg_zero):
    """``sum_j (q_j - zero) * x_j`` over the eight 4-bit codes of each int32 word (float32).

    Code ``j`` sits at bits ``[4j, 4j + 4)``. ``x04`` .. ``x37`` pack the activations of codes
    ``(j, j + 4)`` as bf16 pairs (:func:`pack_bf16x2`); ``neg_zero`` packs ``-(128 + zero)`` twice.
    All arguments share one shape (broadcast them first).
    """
    return tl.inline_asm_elementwise(
        _WORD_DOT_PTX,
        "=r,r,r,r,r,r,r",
        [words, x04, x15, x26, x37, neg_zero],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def code_values(words, high, zero, J: tl.constexpr, BITS: tl.constexpr):
    """``(q - zero) * 2**sh`` (float32, exact) for code ``J`` of every word.

    Codes below bit HI are read in place (the mantissa of 2**23 holds them exactly), the others
    from ``high = words >> HI``: one shift per word instead of one per code.
    """
    HI: tl.constexpr = 20 if BITS == 4 else 16
    SH: tl.constexpr = J * BITS - (HI if J * BITS >= HI else 0)
    MASK: tl.constexpr = ((1 << BITS) - 1) << SH
    if J * BITS >= HI:
        src = high
    else:
        src = words
    f = ((src & MASK) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q * 2**sh
    return f - (8388608.0 + zero * (1 << SH))[:, None]


@triton.jit
def dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N,
          J: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr,
          PER_BLOCK: tl.constexpr, HAS_ZERO: tl.constexpr):  # fmt: skip
    """Dequantized ``(q - zero) * scale`` of code slab ``J``: input features ``J*W .. J*W+W-1``."""
    HI: tl.constexpr = 20 if BITS == 4 else 16
    SH: tl.constexpr = J * BITS - (HI if J * BITS >= HI else 0)
    if not PER_BLOCK:  # groups smaller than a K-block: this slab's own group
        g = (kb * BK + J * (BK * BITS // 32)) // GROUP
        scale = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + g * N + offs_n).to(tl.float32)
    return code_values(words, high, zero, J, BITS) * (scale * (1.0 / (1 << SH)))[:, None]


@triton.jit
def dequant_slabs(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr,
                  PER_BLOCK: tl.constexpr, HAS_ZERO: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """All code slabs of a K-block (:func:`dequant_slab`) in ``dtype``: a tuple of ``32 // BITS`` tensors."""
    if BITS == 4:
        return (
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 0, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 1, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 2, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 3, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 4, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 5, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 6, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 7, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
        )  # fmt: skip
    else:
        return (
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 0, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 1, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 2, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
            dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, 3, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype),
        )  # fmt: skip


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BK // PACK
    HI: tl.constexpr = 20 if BITS == 4 else 16
    PER_BLOCK: tl.constexpr = PER_CHANNEL or GROUP >= BK
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    offs_w = tl.arange(0, WORDS)
    words = tl.load(qw_ptr + kb * N * WORDS + offs_n[:, None] * WORDS + offs_w[None, :])
    high = words >> HI
    g = 0 if PER_CHANNEL else (kb * BK) // GROUP
    scale = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(z_ptr + g * N + offs_n).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    for j in tl.static_range(PACK):
        w = dequant_slab(
            words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N, j, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO
        )
        k = kb * BK + j * WORDS + offs_w
        out = out_ptr + offs_n[:, None] * K + k[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (k < K)[None, :])


def dequantize_packed(packed: PackedWNA16, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype`` (one pass over the packed weight)."""
    n, k = packed.out_features, packed.in_features
    out = torch.empty((n, k), dtype=dtype, device=packed.qweight.device)
    per_channel = packed.group_size == -1
    block_n = 64
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, BLOCK_K))](
        packed.qweight,
        packed.scale,
        packed.zero if packed.zero is not None else packed.scale,
        out,
        n,
        k,
        BITS=packed.bits,
        GROUP=BLOCK_K if per_channel else packed.group_size,
        PER_CHANNEL=per_channel,
        HAS_ZERO=packed.zero is not None,
        BLOCK_N=block_n,
        BK=BLOCK_K,
        num_warps=4,
    )
    return out
