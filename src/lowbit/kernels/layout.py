"""Weight layouts chosen at pack time for the speed of the lowbit Triton kernels.

The W{4,8}A16 kernels read the weight in K-blocks of ``BLOCK_K = 128`` input features. The packed
tensor ``qweight`` has shape ``[K_pad / 128, N, 128 * bits / 32]`` (int32): for each K-block,
every output row's 128 codes sit in 64 (4-bit) or 128 (8-bit) consecutive bytes, and a kernel
tile of ``BLOCK_N`` rows by one K-block is a single contiguous run of memory, read with full
16-byte vector loads. Inside a K-block the codes are interleaved: code ``j`` (bits
``[j*bits, (j+1)*bits)``) of word ``w`` is input feature ``j * W + w`` with ``W`` words per row.
Extracting code ``j`` from every word of a tile therefore yields a contiguous slab of ``W``
input features, in order, which is exactly an operand slice of the matrix product: the kernel
needs no shuffles or reshapes after dequantization (the idea of QUICK, Kim et al. 2024,
https://arxiv.org/abs/2402.10076: reorder at pack time for the matrix instructions).

Scales are stored group-major ``[K_pad / group_size, N]`` so that one K-step reads one
coalesced row of scales; asymmetric zero points likewise, as floats in the scale dtype
(integers up to 255 are exact in bf16 and fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_K = 128


@dataclass(frozen=True)
class PackedWNA16:
    """A weight-only quantized matrix in the kernel layout.

    Attributes:
        qweight: int32 ``[K_pad // 128, N, 128 * bits // 32]``.
        scale: ``[groups_pad, N]`` in the activation dtype (``groups_pad = 1`` per channel).
        zero: unsigned zero points as floats, same shape as ``scale``; ``None`` when symmetric.
        bits: 4 or 8.
        group_size: input features per scale, ``-1`` per output channel.
        in_features: K (unpadded).
        out_features: N.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int


def padded_in_features(in_features: int) -> int:
    """K rounded up to a whole number of kernel K-blocks."""
    return math.ceil(in_features / BLOCK_K) * BLOCK_K


def pack_wna16(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> PackedWNA16:
    """Pack unsigned codes ``q`` ``[N, K]`` (values in ``[0, 2**bits)``) into the kernel layout.

    Args:
        q: integer codes ``[N, K]`` (any integer dtype).
        scale: ``[N, K // group_size]`` (``[N, 1]`` per channel) in the activation dtype.
        zero: unsigned zero points with the scale's shape, or ``None`` (symmetric, ``2**(bits-1)``).
        bits: 4 or 8.
        group_size: input features per scale; ``-1`` per channel. Must divide 128 or be a
            multiple of it, so that a kernel K-block never straddles part of a group.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported by the W{{4,8}}A16 kernels; use 4 or 8")
    n, k = q.shape
    if group_size != -1 and (BLOCK_K % group_size and group_size % BLOCK_K):
        raise ValueError(
            f"group_size {group_size} neither divides nor is a multiple of {BLOCK_K}; "
            "use 32, 64, 128, 256 or -1 (per-channel)"
        )
    if group_size != -1 and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}; use a divisor or -1")
    k_pad = padded_in_features(k)
    codes = torch.zeros(n, k_pad, dtype=torch.int64, device=q.device)
    codes[:, :k] = q.to(torch.int64)
    per_word = 32 // bits
    words_per_block = BLOCK_K // per_word
    # [N, blocks, per_word (j), words (w)]: feature j * words_per_block + w -> word w, code j.
    interleaved = codes.reshape(n, k_pad // BLOCK_K, per_word, words_per_block).transpose(2, 3)
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (interleaved << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qweight = words.permute(1, 0, 2).contiguous()

    def group_major(t: torch.Tensor) -> torch.Tensor:
        t = t.t()
        if group_size != -1 and k_pad > k:
            extra = (k_pad - k + group_size - 1) // group_size
            t = torch.cat([t, t[-1:].expand(extra, n)], 0)
        return t.contiguous()

    return PackedWNA16(
        qweight=qweight,
        scale=group_major(scale),
        zero=None if zero is None else group_major(zero.to(scale.dtype)),
        bits=bits,
        group_size=group_size,
        in_features=k,
        out_features=n,
    )


def unpack_codes(packed: PackedWNA16) -> torch.Tensor:
    """The unsigned codes ``[N, K]`` (int32) of a packed weight."""
    bits, n, k = packed.bits, packed.out_features, packed.in_features
    shifts = torch.arange(0, 32, bits, device=packed.qweight.device, dtype=torch.int32)
    # code j of word w is feature j * words + w of the K-block; arithmetic shifts then the mask are exact in int32
    codes = (packed.qweight[:, :, None, :] >> shifts[:, None]) & (2**bits - 1)  # [blocks, N, per_word, words]
    return codes.reshape(packed.qweight.shape[0], n, BLOCK_K).permute(1, 0, 2).reshape(n, -1)[:, :k]


def unpack_wna16(packed: PackedWNA16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`pack_wna16`: ``(q [N, K] int16, scale [N, G], zero or None)``."""
    k = packed.in_features
    codes = unpack_codes(packed)
    groups = 1 if packed.group_size == -1 else k // packed.group_size
    scale = packed.scale[:groups].t().contiguous()
    zero = None if packed.zero is None else packed.zero[:groups].t().to(torch.int16).contiguous()
    return codes.to(torch.int16), scale, zero


def unpack_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_shape: tuple[int, int],
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned codes ``[N, K]``, scales and unsigned zero points of a "pack-quantized" weight.

    compressed-tensors stores signed codes offset by ``2**(bits-1)`` densely in int32 along the
    input dimension, and signed zero points packed along the output dimension
    (``compressed_tensors.compressors.pack_quantized.helpers``). Both become unsigned here;
    ``(q - zero) * scale`` is unchanged.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n, k = int(weight_shape[0]), int(weight_shape[1])
    offset = 2 ** (bits - 1)
    q = unpack_from_int32(weight_packed, bits, torch.Size((n, k)), packed_dim=1).to(torch.int16) + offset
    zero = None
    if weight_zero_point is not None:
        if weight_zero_point.dtype == torch.int32 and bits < 8:
            zp = unpack_from_int32(weight_zero_point, bits, weight_scale.shape, packed_dim=0)
        else:
            zp = weight_zero_point
        zero = zp.to(torch.int16) + offset
    return q, weight_scale, zero


def from_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_shape: tuple[int, int],
    bits: int,
    group_size: int,
) -> PackedWNA16:
    """Repack a compressed-tensors "pack-quantized" weight (contiguous groups) into the kernel layout."""
    q, scale, zero = unpack_compressed_tensors(
        weight_packed, weight_scale, weight_zero_point, weight_shape, bits
    )
    return pack_wna16(q, scale, zero, bits, group_size)
