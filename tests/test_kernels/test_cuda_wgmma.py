"""The wgmma W4A16 GEMM (lowbit.kernels.cuda_wgmma): on the CPU, its launch accounting and a bit-level replay of
its index mapping (the A fragments each lane dequantizes, the activations' shared-memory layout as the ``cp.async``
copies write it and as the B descriptor reads it by the PTX ISA's canonical K-major layout, the accumulators the
epilogue stores); on a Hopper GPU, its outputs against float64 for every scheme, split-K determinism (eagerly and
in a CUDA graph) and strided tokens."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from tests.test_kernels.bench_scripts import bench_module
from tests.test_kernels.gpu_chains import assert_repeatable
from tests.test_kernels.test_cuda_gemm import (
    MASK32,
    T4,
    G,
    assert_candidates_match_float64,
    bf16_bits_to_float,
    dequant_pair,
    float_to_bf16_bits,
    halves,
    prmt,
    raw_codes,
)
from tests.test_kernels.test_cuda_gemv import float64_product, packed_weight, rel_err

from lowbit.kernels import cuda_wgmma, w4a16
from lowbit.kernels.cuda_wgmma import CudaWgmmaConfig
from lowbit.kernels.layout import pack_wna16

GPU = torch.cuda.is_available()
HOPPER = GPU and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(
    not HOPPER, reason="wgmma needs a Hopper GPU (compute capability 9.x, sm_90a)"
)

# --- a bit-level replay of the kernel ----------------------------------------------------------------------------

STALE = 0x7FC0  # a bf16 NaN: shared memory the kernel never wrote (token rows past M)


def read_b(smem: torch.Tensor, base: int, desc: int, tokens: int) -> torch.Tensor:
    """The 16 x ``tokens`` bf16 B operand a ``wgmma`` reads through ``desc`` (K-major), by the PTX ISA's canonical
    layouts. No swizzle: element (k, n) at start + (k // 8) LBO + (n // 8) SBO + 16 (n % 8) + 2 (k % 8) bytes.
    128-byte swizzle: at start + (n // 8) SBO + 128 (n % 8) + 2 k, then address bits 4-6 XOR bits 7-9 (the row in
    its 1 KiB-aligned 8-row atom). ``smem`` holds the stage's activations as bf16 bits from byte address ``base``."""
    start = (desc & 0x3FFF) << 4
    lbo, sbo = ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    mode = desc >> 62
    assert mode in (0, 1) and ((desc >> 49) & 7) == 0  # none or 128 bytes, base offset 0
    k = torch.arange(16).view(16, 1)
    n = torch.arange(tokens).view(1, tokens)
    if mode == 0:
        address = start + (k // 8) * lbo + (n // 8) * sbo + 16 * (n % 8) + 2 * (k % 8)
    else:
        address = start + (n // 8) * sbo + 128 * (n % 8) + 2 * k
        address = address ^ (((address >> 7) & 7) << 4)
    return bf16_bits_to_float(smem[(address - base) // 2]).double()


def x_piece(m: int, p: int, tokens: int, swizzle: bool) -> int:
    """Where the kernel's ``cp.async`` puts piece ``p`` of token ``m`` (its ``x_piece``), in bytes."""
    if swizzle:
        return (p >> 3) * (tokens * 128) + m * 128 + (((p & 7) ^ (m & 7)) << 4)
    return 16 * (p * tokens + m)


def x_step(j: int, tokens: int, swizzle: bool) -> int:
    """Where the kernel's step ``j`` starts (its ``x_step``), in bytes."""
    return (j >> 2) * (tokens * 128) + (j & 3) * 32 if swizzle else 2 * j * (16 * tokens)


def emulate_wgmma(
    x: torch.Tensor, packed, cfg: CudaWgmmaConfig, bug: str | None = None, workers: int = 5
) -> torch.Tensor:
    """``lowbit_w4a16_wgmma`` replayed warpgroup by warpgroup and lane by lane from its source: the staged weight
    rows, the activations written where its ``cp.async`` puts them (stale NaNs past M), the ``prmt`` packs and
    dequantization of every A register, each step's B read through the descriptor the kernel builds, the products
    into the accumulators (the D fragment layout), the float32 tile and the split-K sum in slice order.
    ``bug="words"``: A from the mma.sync GEMM's words 4t .. 4t + 3 (its permuted K order); ``bug="offsets"``: the
    descriptor's two byte offsets swapped; ``bug="swizzle"``: the descriptor's swizzle mode flipped. Stream-K: the
    tiles' K-blocks shared out among ``workers`` as :func:`lowbit.kernels.cuda_wgmma.stream_segments` says, each
    tile's partial sums added in slot order."""
    m_total, k = x.shape
    n = packed.out_features
    words = packed.qweight.to(torch.int64) & MASK32  # [K / 128, N, 16]
    scale_bits = packed.scale.view(torch.int16).to(torch.int64) & 0xFFFF
    zero_bits = None if packed.zero is None else packed.zero.view(torch.int16).to(torch.int64) & 0xFFFF
    per_channel = packed.group_size == -1
    late = cfg.late_scale and not per_channel
    group_blocks = 1 if per_channel else packed.group_size // 128
    x_bits = x.view(torch.int16).to(torch.int64) & 0xFFFF
    rows_per_block, tokens_per_block = cfg.block_rows, cfg.block_tokens
    num_kb = k // 128
    per_split = -(-num_kb // cfg.split)
    out = torch.zeros(m_total, n, dtype=torch.float32)
    xs_base = 1 << 14  # any 16-byte aligned shared address
    lbo, sbo = cuda_wgmma.b_offsets(tokens_per_block, cfg.swizzle)

    def neg_zero_pair(zbits):
        z = (
            bf16_bits_to_float(zbits)
            if zero_bits is not None
            else torch.full_like(zbits, 8.0, dtype=torch.float32)
        )
        nz = float_to_bf16_bits(-(128.0 + z))
        return nz | (nz << 16)

    m_tiles = -(-m_total // tokens_per_block)
    tiles = -(-n // rows_per_block) * m_tiles
    ranges = {
        t: [(s * per_split, min(num_kb, (s + 1) * per_split)) for s in range(cfg.split)] for t in range(tiles)
    }
    if cfg.stream:  # the tile's (first K-block, end) by slot
        by_slot = {}
        for share in cuda_wgmma.stream_segments(tiles, num_kb, workers):
            for tile, kb_lo, nk, slot, _ in share:
                by_slot[tile, slot] = (kb_lo, kb_lo + nk)
        ranges = {
            t: [by_slot[t, s] for s in range(sum(key[0] == t for key in by_slot))] for t in range(tiles)
        }
    for n0, m0 in itertools.product(range(0, n, rows_per_block), range(0, m_total, tokens_per_block)):
        tokens = min(tokens_per_block, m_total - m0)
        slices = []
        for kb_lo, kb_hi in ranges[(n0 // rows_per_block) * m_tiles + m0 // tokens_per_block]:
            # acc[warp][64-row tile][lane][4 c + 2 h + e]
            acc = torch.zeros(cfg.warps, cfg.rows, 32, tokens_per_block // 2, dtype=torch.float64)
            for kb in range(kb_lo, kb_hi):
                rows_n = torch.clamp(n0 + torch.arange(rows_per_block), max=n - 1)
                ws = torch.zeros(
                    rows_per_block, 16, dtype=torch.int64
                )  # the staged rows, chunks XOR-swizzled
                for r, q in itertools.product(range(rows_per_block), range(4)):
                    at = 4 * (q ^ ((r >> 1) & 3))  # w_chunk(r, q), in words
                    ws[r, at : at + 4] = words[kb, rows_n[r], 4 * q : 4 * q + 4]
                smem = torch.full((8 * 16 * tokens_per_block,), STALE, dtype=torch.int64)
                for m, part in itertools.product(range(tokens), range(16)):
                    at = x_piece(m, part, tokens_per_block, cfg.swizzle) // 2
                    smem[at : at + 8] = x_bits[m0 + m, 128 * kb + 8 * part : 128 * kb + 8 * part + 8]
                grp = 0 if per_channel else kb // group_blocks
                ss = scale_bits[grp, rows_n]
                zs = zero_bits[grp, rows_n] if zero_bits is not None else torch.zeros_like(ss)
                for q, r in itertools.product(range(cfg.groups), range(cfg.rows)):
                    frags = {}
                    for wq in range(4):
                        wrow = q * 64 * cfg.rows + 16 * wq
                        packs, neg_zero, scale2 = {}, {}, {}
                        for h in range(2):
                            row = wrow + 64 * r + 8 * h + G
                            swz = (row >> 1) & 3
                            if (
                                bug == "words"
                            ):  # the mma.sync GEMM's words 4 t .. 4 t + 3 (its chunk t, unswizzled)
                                lo = (ws[row, 4 * T4], ws[row, 4 * T4 + 1])
                                hi = (ws[row, 4 * T4 + 2], ws[row, 4 * T4 + 3])
                            else:  # uint2 at w_chunk(row, t >> 1) + 8 (t & 1) and at w_chunk(row, 2 + (t >> 1)) + ...
                                at_lo = 4 * ((T4 >> 1) ^ swz) + 2 * (T4 & 1)
                                at_hi = 4 * ((2 + (T4 >> 1)) ^ swz) + 2 * (T4 & 1)
                                lo = (ws[row, at_lo], ws[row, at_lo + 1])
                                hi = (ws[row, at_hi], ws[row, at_hi + 1])
                            packs[h] = [
                                prmt(*lo, 0x5410),
                                prmt(*lo, 0x7632),
                                prmt(*hi, 0x5410),
                                prmt(*hi, 0x7632),
                            ]
                            neg_zero[h] = neg_zero_pair(zs[row])
                            scale2[h] = ss[row] | (ss[row] << 16)
                        frags[wq] = (packs, neg_zero, scale2)
                    for j in range(8):
                        A = torch.zeros(64, 16, dtype=torch.float64)
                        for wq in range(4):
                            packs, neg_zero, scale2 = frags[wq]
                            unscaled = per_channel or late  # q - z: the scale goes on the float32 sums
                            regs = [
                                dequant_pair(raw_codes(packs[0][j >> 2], j & 3), neg_zero[0], scale2[0], unscaled),
                                dequant_pair(raw_codes(packs[1][j >> 2], j & 3), neg_zero[1], scale2[1], unscaled),
                                dequant_pair(raw_codes(packs[0][2 + (j >> 2)], j & 3), neg_zero[0], scale2[0], unscaled),
                                dequant_pair(raw_codes(packs[1][2 + (j >> 2)], j & 3), neg_zero[1], scale2[1], unscaled),
                            ]  # fmt: skip
                            # the A fragment of warp wq (PTX ISA: as mma.m16n8k16's A, rows 16 wq .. 16 wq + 15)
                            for reg, row, col in ((regs[0], G, 2 * T4), (regs[1], G + 8, 2 * T4),
                                                  (regs[2], G, 2 * T4 + 8), (regs[3], G + 8, 2 * T4 + 8)):  # fmt: skip
                                low, high = halves(reg)
                                A[16 * wq + row, col], A[16 * wq + row, col + 1] = low.double(), high.double()
                        # the stage's descriptor plus the step's offset in 16-byte units, as the kernel builds it
                        desc = cuda_wgmma.b_descriptor(xs_base, tokens_per_block, cfg.swizzle) + (
                            x_step(j, tokens_per_block, cfg.swizzle) >> 4
                        )
                        if bug == "offsets":
                            desc = (
                                (desc & 0x3FFF) | ((sbo >> 4) << 16) | ((lbo >> 4) << 32) | (desc >> 62 << 62)
                            )
                        if bug == "swizzle":
                            desc ^= 1 << 62
                        B = read_b(smem, xs_base, desc, tokens_per_block)
                        D = A @ B  # [64, tokens]
                        for wq, h, c, e in itertools.product(
                            range(4), range(2), range(tokens_per_block // 8), range(2)
                        ):
                            # late_scale: the K-block's sums times the row's scale (linear, so per step here)
                            row = q * 64 * cfg.rows + 16 * wq + 64 * r + 8 * h + G
                            s = bf16_bits_to_float(ss[row]).double() if late else 1.0
                            acc[4 * q + wq, r, :, 4 * c + 2 * h + e] += (
                                s * D[16 * wq + 8 * h + G, 8 * c + 2 * T4 + e]
                            )
            # the epilogue: partial[(8 c + 2 t + e) * BLOCK_ROWS + row] = s * acc[r][4 c + 2 h + e], in float32
            partial = torch.zeros(tokens_per_block, rows_per_block, dtype=torch.float32)
            for warp, r, h, c, e in itertools.product(
                range(cfg.warps), range(cfg.rows), range(2), range(tokens_per_block // 8), range(2)
            ):
                row = (warp >> 2) * 64 * cfg.rows + 16 * (warp & 3) + 64 * r + 8 * h + G
                s = (
                    bf16_bits_to_float(scale_bits[0, torch.clamp(n0 + row, max=n - 1)])
                    if per_channel
                    else 1.0
                )
                partial[8 * c + 2 * T4 + e, row] = s * acc[warp, r, :, 4 * c + 2 * h + e].float()
            slices.append(partial)
        total = slices[0].clone()
        for later in slices[1:]:
            total += later
        rows_kept = min(rows_per_block, n - n0)
        out[m0 : m0 + tokens, n0 : n0 + rows_kept] = total[:tokens, :rows_kept]
    return out.to(torch.bfloat16)


@pytest.mark.parametrize(
    ("group", "asymmetric", "cfg", "k"),
    [
        (128, False, CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, split=1), 768),
        (128, True, CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, split=1, swizzle=False), 768),
        (256, True, CudaWgmmaConfig(rows=2, groups=1, tokens=16, stages=3, split=2), 768),
        (-1, True, CudaWgmmaConfig(rows=1, groups=4, tokens=32, stages=3, split=3, depth=4), 768),
        (-1, False, CudaWgmmaConfig(rows=1, groups=1, tokens=32, stages=4, split=1, swizzle=False), 768),
        (128, True, CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, split=4), 640),
        (128, True, CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, stream=True), 640),
        (-1, True, CudaWgmmaConfig(rows=2, groups=1, tokens=16, stages=3, stream=True), 768),
        (
            128,
            True,
            CudaWgmmaConfig(rows=1, groups=2, tokens=16, stages=4, stream=True, continuous=True, per_sm=2),
            640,
        ),
        (256, True, CudaWgmmaConfig(rows=2, groups=1, tokens=16, stages=3, split=2, late_scale=True), 768),
        (128, False, CudaWgmmaConfig(rows=1, groups=2, tokens=32, stages=3, split=3, late_scale=True), 640),
        (-1, True, CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, late_scale=True), 768),
        (128, True, CudaWgmmaConfig(rows=1, groups=2, tokens=16, stages=3, split=2, depth=8), 768),
    ],
)
def test_emulated_kernel_mapping_gives_the_product(group, asymmetric, cfg, k):
    """The kernel's index mapping, replayed bit by bit on the CPU with B read by the PTX ISA's descriptor layout,
    gives ``x @ dequant(W).T`` (float64 reference): every scheme, rows past N (a partial row tile), tokens past M
    (stale NaNs in shared memory reach no stored output), a second token tile, split-K (5 K-blocks in 4 slices:
    2, 2, 1 and an empty one)."""
    n, m = 150, 19
    packed = packed_weight(n, k, group, asymmetric, "cpu", seed=3)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = emulate_wgmma(x, packed, cfg)
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, float64_product(x, packed)) < 3e-3


@pytest.mark.parametrize(
    ("bug", "swizzle"), [("words", True), ("offsets", True), ("offsets", False), ("swizzle", True)]
)
def test_emulation_catches_a_layout_bug(bug, swizzle):
    """The replay is not vacuous: the mma.sync GEMM's word order, the descriptor's offsets swapped or its swizzle
    mode flipped give garbage."""
    packed = packed_weight(64, 256, 128, False, "cpu", seed=1)
    x = torch.randn(16, 256).to(torch.bfloat16)
    cfg = CudaWgmmaConfig(rows=1, groups=1, tokens=16, stages=3, swizzle=swizzle)
    assert rel_err(emulate_wgmma(x, packed, cfg, bug=bug), float64_product(x, packed)) > 0.5


# --- launch accounting -------------------------------------------------------------------------------------------


def test_config_validation():
    """Rows, warpgroups, tokens, stages, split and depth outside what the kernel compiles are errors that say which."""
    assert (CudaWgmmaConfig().block_rows, CudaWgmmaConfig().block_tokens, CudaWgmmaConfig().warps) == (
        128,
        128,
        8,
    )
    assert CudaWgmmaConfig(rows=2, groups=2, tokens=64).block_rows == 256
    for bad, match in (
        ({"rows": 3}, "rows"),
        ({"groups": 3}, "groups"),
        ({"depth": 3}, "depth"),
        ({"tokens": 48}, "tokens"),
        ({"rows": 2, "tokens": 256}, "accumulators"),
        ({"stages": 2}, "stages"),
        ({"groups": 4, "tokens": 128}, "128 registers"),
        ({"split": 0}, "split"),
        ({"split": cuda_wgmma.MAX_SPLIT + 1}, "split"),
        ({"stream": True, "split": 2}, "stream-K"),
        ({"cluster": True}, "cluster"),
        ({"cluster": True, "split": 2, "stream": True}, "cluster"),
        ({"producer": True, "stream": True}, "producer"),
        ({"producer": True, "groups": 1}, "producer"),
        ({"continuous": True}, "continuous"),
        ({"per_sm": 2}, "per_sm"),
        ({"per_sm": 3, "stream": True}, "per_sm"),
        ({"per_sm": 2, "stream": True, "groups": 4, "tokens": 16}, "per_sm"),
        ({"per_sm": 2, "stream": True, "rows": 2, "tokens": 64}, "per_sm"),
        ({"late_scale": True, "tokens": 64}, "late_scale"),
    ):
        with pytest.raises(ValueError, match=match):
            CudaWgmmaConfig(**bad)


def test_shared_memory_accounting_and_descriptor_fields():
    """A stage holds a K-block of the block's weight rows (64 bytes each), its tokens' activations (256 bytes each)
    and a scale and zero per row; every candidate fits in Hopper's 227 KiB opt-in limit and keeps 16-byte aligned
    stages; the descriptor's fields hold the offsets in 16-byte units."""
    cfg = CudaWgmmaConfig(rows=1, groups=2, tokens=128, stages=4)
    assert cuda_wgmma.stage_bytes(cfg) == 41 * 1024  # 128 * 256 + 128 * 64 + 128 * 4, rounded up to 1 KiB
    assert cuda_wgmma.shared_bytes(cfg) == 4 * cuda_wgmma.stage_bytes(cfg) + 1024
    # continuous stream-K keeps its float32 tile apart from the stages (the next tile's copies are in flight)
    flowing = CudaWgmmaConfig(rows=1, groups=2, tokens=16, stages=4, stream=True, continuous=True)
    assert cuda_wgmma.shared_bytes(flowing) == 4 * cuda_wgmma.stage_bytes(flowing) + 4 * 128 * 16 + 1024
    hopper_limit = 232448
    for m in (16, 17, 32, 33, 64, 100, 128, 256):
        for c in cuda_wgmma.candidates(m):
            assert cuda_wgmma.shared_bytes(c) + 16 + 1024 <= hopper_limit, c
            assert cuda_wgmma.stage_bytes(c) % 1024 == 0
    desc = cuda_wgmma.b_descriptor(0x1230, 64, swizzle=False)
    assert (
        desc & 0x3FFF == 0x123
        and (desc >> 16) & 0x3FFF == 64
        and (desc >> 32) & 0x3FFF == 8
        and desc >> 62 == 0
    )
    desc = cuda_wgmma.b_descriptor(0x1230, 64, swizzle=True)
    assert (
        desc & 0x3FFF == 0x123
        and (desc >> 16) & 0x3FFF == 1
        and (desc >> 32) & 0x3FFF == 64
        and desc >> 62 == 1
    )
    # the kernel adds step j's offset (in 16-byte units) to its stage's descriptor: the same as building the
    # descriptor at the step's address, for every stage of every candidate (the 14-bit address field never carries)
    for m in (16, 64, 128):
        for c in cuda_wgmma.candidates(m):
            for stage, j in itertools.product(range(c.stages), range(8)):
                base = 1024 + stage * cuda_wgmma.stage_bytes(c)
                step = x_step(j, c.tokens, c.swizzle)
                stage_desc = cuda_wgmma.b_descriptor(base, c.tokens, c.swizzle)
                assert stage_desc + (step >> 4) == cuda_wgmma.b_descriptor(base + step, c.tokens, c.swizzle)


@pytest.mark.parametrize(
    ("tiles", "num_kb", "workers"),
    [(112, 64, 132), (56, 32, 132), (3, 5, 7), (4, 22, 11), (2, 3, 6), (9, 1, 4)],
)
def test_stream_segments_share_every_k_block_once(tiles, num_kb, workers):
    """Stream-K's shares: every (tile, K-block) in exactly one segment, each worker's segments one contiguous run of
    near-equal length, and a tile's segments numbered 0 .. count - 1 in K order, all of them with the same count."""
    shares = cuda_wgmma.stream_segments(tiles, num_kb, workers)
    assert len(shares) == workers
    seen = []
    for share in shares:
        units = [t * num_kb + kb for t, kb_lo, nk, _, _ in share for kb in range(kb_lo, kb_lo + nk)]
        assert units == list(range(units[0], units[0] + len(units))) if units else True
        assert tiles * num_kb // workers <= len(units) <= -(-tiles * num_kb // workers)
        seen += units
    assert sorted(seen) == list(range(tiles * num_kb))
    for tile in range(tiles):
        parts = sorted(
            (slot, kb_lo, nk, count) for share in shares for t, kb_lo, nk, slot, count in share if t == tile
        )
        assert [p[0] for p in parts] == list(range(len(parts)))
        assert {p[3] for p in parts} == {len(parts)}
        assert [p[1] for p in parts] == sorted(p[1] for p in parts) and parts[0][1] == 0
        assert sum(p[2] for p in parts) == num_kb


def test_stream_workers_keep_each_tile_within_its_slots():
    """One worker per SM where every tile is shared by at most STREAM_SLOTS of them (the 112 256x128 tiles of
    8192x28672 at 128 tokens: all 132 SMs), fewer where tiles are short (a 4-tile, 22-K-block product: not 88)."""
    cfg = CudaWgmmaConfig(2, 2, 128, 4, depth=4, stream=True)
    assert cuda_wgmma.stream_workers(cfg, 128, 28672, 8192, 132) == 132
    assert cuda_wgmma.stream_workers(cfg, 128, 14336, 4096, 132) == 132
    two = CudaWgmmaConfig(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2)
    assert cuda_wgmma.stream_workers(two, 16, 14336, 4096, 132) == 264
    few = cuda_wgmma.stream_workers(cfg, 100, 1000, 2816, 132)
    assert few < 88
    assert cuda_wgmma.max_sharers(cuda_wgmma.stream_segments(4, 22, few)) <= cuda_wgmma.STREAM_SLOTS
    assert cuda_wgmma.max_sharers(cuda_wgmma.stream_segments(4, 22, few + 1)) > cuda_wgmma.STREAM_SLOTS
    assert cuda_wgmma.workspace_bytes(cfg, 128, 28672) == 4 * cuda_wgmma.STREAM_SLOTS * 112 * 256 * 128


def test_candidates_are_short_and_cover_the_token_counts():
    """A short list per token count, of valid launches whose blocks hold M tokens (at most 128 per block; past 64
    tokens also 64-token blocks); the tuner times the swizzled ones (the unswizzled two: the benchmark's)."""
    for m in (16, 17, 32, 33, 64, 100, 128, 256):
        cands = cuda_wgmma.candidates(m)
        assert 3 <= len(cands) <= 28 and len(set(cands)) == len(cands)
        assert 3 <= sum(map(cuda_wgmma.in_runtime, cands)) == len(cands) - 2
        assert any(c.late_scale for c in cands) == (m <= 32)
        assert all(c.block_tokens >= min(m, 128) or (m > 64 and c.block_tokens == 64) for c in cands), m
        assert any(c.split == 1 for c in cands) and any(c.split > 1 for c in cands)


def test_source_names_the_launch_and_scheme():
    """The macros of one launch and scheme come first, then the shared helpers and the kernel with its wgmma shape."""
    src = cuda_wgmma.source(CudaWgmmaConfig(rows=2, groups=2, tokens=64, stages=3, split=2), 2, False, True)
    for line in ("#define GROUPS 2", "#define ROWS 2", "#define BLOCK_TOKENS 64", "#define STAGES 3",
                 "#define SPLIT 2", "#define GROUP_BLOCKS 2", "#define PER_CHANNEL 0", "#define HAS_ZERO 1",
                 "#define B_LBO 16", "#define B_SBO 1024", "#define B_SWIZZLE 1"):  # fmt: skip
        assert line in src
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in src
    assert src.index("cp_async16") < src.index("lowbit_w4a16_wgmma")
    assert "#define CLUSTER 0" in src and "#define STREAM_K 0" in src
    clustered = cuda_wgmma.source(
        CudaWgmmaConfig(rows=2, groups=2, tokens=64, split=4, cluster=True), 1, False, True
    )
    assert "#define CLUSTER 1" in clustered and "__cluster_dims__(1, SPLIT, 1)" in clustered
    assert cuda_wgmma.workspace_bytes(CudaWgmmaConfig(split=4, cluster=True), 128, 4096) == 0


def test_gemm_refuses_what_it_cannot_take():
    """CPU tensors are an error, not garbage (the GPU cases: test_gpu_wgmma_refuses_and_the_runtime_falls_back)."""
    packed = packed_weight(64, 256, 128, False, "cpu")
    x = torch.randn(20, 256).to(torch.bfloat16)
    assert not cuda_wgmma.supported(x, packed)
    with pytest.raises(ValueError, match="does not take"):
        cuda_wgmma.gemm(x, packed, CudaWgmmaConfig())


@hopper_only
def test_gpu_wgmma_refuses_and_the_runtime_falls_back():
    """fp16 tokens, 8-bit codes, 64-feature groups and tokens whose rows are not 16-byte aligned are refused by the
    kernel, and wna16_matmul given a wgmma launch runs the default launch for them instead (the same output)."""
    n, k, m = 256, 512, 40
    gen = torch.Generator().manual_seed(5)
    q8 = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.int16).cuda()
    scale = (torch.rand(n, k // 128, generator=gen) * 0.004 + 0.001).to(torch.bfloat16).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wide = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)
    cases = {
        "fp16 tokens": (x.half(), packed_weight(n, k, 128, False, "cuda", dtype=torch.float16)),
        "8-bit codes": (x, pack_wna16(q8, scale, None, 8, 128)),
        "64-feature groups": (x, packed_weight(n, k, 64, True, "cuda")),
        "misaligned rows": (wide[:, 4 : 4 + k], packed_weight(n, k, 128, False, "cuda")),
    }
    cfg = next(c for c in w4a16.candidate_configs(m) if c.wgmma)
    for name, (tokens, packed) in cases.items():
        assert not cuda_wgmma.supported(tokens, packed), name
        with pytest.raises(ValueError, match="does not take"):
            cuda_wgmma.gemm(tokens, packed, cfg.wgmma_config())
        default = w4a16.wna16_matmul(tokens, packed, w4a16.default_config(m, n, k))
        assert torch.equal(w4a16.wna16_matmul(tokens, packed, cfg), default), name


# --- on a Hopper GPU ---------------------------------------------------------------------------------------------


@hopper_only
@pytest.mark.parametrize(
    ("group", "asymmetric", "m"),
    [
        (g, a, m)
        for (g, a) in itertools.product((128, 256, -1), (False, True))
        for m in (5, 17, 64, 100, 128, 200)
    ],
)
def test_gpu_wgmma_matches_float64(group, asymmetric, m):
    """Every candidate launch for M tokens against float64: every scheme, a partial row tile (N = 1000 with 128-
    and 256-row blocks), partial token tiles, split-K over uneven K-slices (22 K-blocks in 2 or 4)."""
    assert_candidates_match_float64(cuda_wgmma, group, asymmetric, m)


@hopper_only
@pytest.mark.parametrize("n", [999, 1004])
def test_gpu_wgmma_odd_row_counts(n):
    """N not a multiple of 8: the scales and zeros cannot be copied 16 bytes at a time and are loaded plainly."""
    packed = packed_weight(n, 1024, 128, True, "cuda")
    x = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)
    for cfg in (CudaWgmmaConfig(1, 2, 64, 4), CudaWgmmaConfig(2, 2, 64, 3, split=2, depth=4)):
        assert rel_err(cuda_wgmma.gemm(x, packed, cfg), float64_product(x, packed)) < 3e-3, cfg


@hopper_only
@pytest.mark.parametrize("cfg", [CudaWgmmaConfig(1, 2, 128, 4, split=2), CudaWgmmaConfig(2, 2, 64, 3, split=3, depth=4),
                                 CudaWgmmaConfig(1, 1, 128, 4, split=8, depth=4),
                                 CudaWgmmaConfig(1, 4, 64, 5, split=8, depth=4),
                                 CudaWgmmaConfig(2, 2, 128, 4, depth=4, stream=True),
                                 CudaWgmmaConfig(1, 2, 64, 5, depth=4, stream=True),
                                 CudaWgmmaConfig(1, 2, 64, 5, depth=4, stream=True, continuous=True),
                                 CudaWgmmaConfig(2, 2, 64, 4, depth=4, stream=True, continuous=True),
                                 CudaWgmmaConfig(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2),
                                 CudaWgmmaConfig(1, 2, 32, 5, split=4, depth=4, late_scale=True),
                                 CudaWgmmaConfig(1, 2, 128, 5, split=4, depth=4, cluster=True),
                                 CudaWgmmaConfig(1, 2, 128, 4, split=2, depth=4, producer=True),
                                 CudaWgmmaConfig(2, 2, 64, 4, depth=4, producer=True)])  # fmt: skip
def test_gpu_wgmma_split_k_is_deterministic_and_graph_safe(cfg):
    """Split-K slices are added in order by the last block of a tile (bitwise the same every call, counters reset),
    eagerly and replayed from a CUDA graph; tokens read through a row stride (a view of a wider tensor)."""
    n, k, m = 4096, 4096, 100
    packed = packed_weight(n, k, 128, False, "cuda")
    wide = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 32 : 32 + k]
    assert cuda_wgmma.supported(x, packed)
    first = assert_repeatable(lambda: cuda_wgmma.gemm(x, packed, cfg))
    assert rel_err(first, float64_product(x, packed)) < 3e-3
    assert torch.equal(cuda_wgmma.gemm(x.contiguous(), packed, cfg), first)


# --- in the runtime's W4A16 matmul -------------------------------------------------------------------------------


def test_runtime_candidates_round_trip_and_cover_16_to_255_tokens():
    """The tuner times the swizzled wgmma launches (cluster and producer twins included) for 16-255 tokens only (the
    GEMVs take 1-16 as well, the dense path 256+), and a WNA16Config names its CudaWgmmaConfig exactly."""
    for m in (1, 8, 15, 256, 1024):
        assert not any(c.wgmma for c in w4a16.candidate_configs(m)), m
    for m in (16, 17, 64, 100, 128, 255):
        launches = [c for c in w4a16.candidate_configs(m) if c.wgmma]
        assert launches, m
        assert [c.wgmma_config() for c in launches] == [
            c for c in cuda_wgmma.candidates(m) if cuda_wgmma.in_runtime(c)
        ]
        assert all(c.wgmma_config().swizzle for c in launches)
        assert any(c.cluster for c in launches) and any(c.producer for c in launches)
        assert all(w4a16.WNA16Config.from_wgmma(c.wgmma_config()) == c for c in launches)
    with pytest.raises(ValueError, match="swizzled"):
        w4a16.WNA16Config.from_wgmma(CudaWgmmaConfig(swizzle=False))
    late = CudaWgmmaConfig(tokens=16, late_scale=True)  # measured in session 20: a runtime launch
    assert w4a16.WNA16Config.from_wgmma(late).wgmma_config() == late


def test_tuner_skips_launches_whose_workspace_is_too_large():
    """Split-K workspaces are whole padded float32 tiles per slice, kept for the process: the tuner leaves out launches
    past WGMMA_WORKSPACE_CAP (8 slices of 8192x28672 at 200 tokens: 235 MB) and keeps one-slice launches (none)."""
    eight = CudaWgmmaConfig(1, 2, 128, 4, split=8, depth=4)
    assert cuda_wgmma.workspace_bytes(eight, 200, 28672) == 4 * 8 * (224 * 2) * 128 * 128
    assert cuda_wgmma.workspace_bytes(CudaWgmmaConfig(2, 2, 128, 4, depth=4), 200, 28672) == 0
    assert not w4a16.wgmma_affordable(w4a16.WNA16Config.from_wgmma(eight), 200, 28672)
    assert w4a16.wgmma_affordable(w4a16.WNA16Config.from_wgmma(eight), 128, 4096)
    launches = [c for c in w4a16.candidate_configs(200) if c.wgmma]
    assert any(w4a16.wgmma_affordable(c, 200, 28672) for c in launches)


@pytest.mark.skipif(
    HOPPER, reason="the fallback where wgmma cannot run; test_gpu_runtime_runs_wgmma covers Hopper"
)
def test_runtime_falls_back_where_wgmma_cannot_run():
    """Without a Hopper GPU (here: Triton's interpreter on the CPU) a wgmma launch runs the default Triton launch
    instead."""
    packed = packed_weight(64, 256, 128, True, "cpu")
    x = torch.randn(20, 256).to(torch.bfloat16)
    cfg = next(c for c in w4a16.candidate_configs(20) if c.wgmma)
    out = w4a16.wna16_matmul(x, packed, cfg)
    assert torch.equal(out, w4a16.wna16_matmul(x, packed, w4a16.default_config(20, 64, 256)))
    assert rel_err(out, float64_product(x, packed)) < 1e-2


@hopper_only
@pytest.mark.parametrize("m", [17, 64, 128, 200])
def test_gpu_runtime_runs_wgmma(m):
    """wna16_matmul runs each wgmma candidate (leading dimensions folded into tokens) and its tuner may choose one."""
    packed = packed_weight(2048, 1024, 128, False, "cuda")
    x = torch.randn(2, m, 1024, device="cuda", dtype=torch.bfloat16)
    ref = float64_product(x.reshape(-1, 1024), packed)
    for cfg in (c for c in w4a16.candidate_configs(2 * m) if c.wgmma):
        out = w4a16.wna16_matmul(x, packed, cfg)
        assert out.shape == (2, m, 2048)
        assert rel_err(out.reshape(-1, 2048), ref) < 3e-3, cfg
    assert rel_err(w4a16.wna16_matmul(x, packed).reshape(-1, 2048), ref) < 3e-3


@pytest.mark.parametrize(("swizzle", "producer"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(
    ("rows", "groups", "tokens"), [(1, 1, 16), (2, 2, 128), (1, 4, 64), (1, 2, 32), (2, 1, 64)]
)
def test_copy_plan_copies_every_piece_once(rows, groups, tokens, swizzle, producer):
    """The kernel's per-thread copies (offsets computed once: weight row tid / 4 + u CT / 4, token tid / 16 + u
    CT / 16, shared offsets moving by a constant per u; CT copying threads: all of them, or the producer warpgroup's
    128) are exactly the copies of a plain loop over the pieces, every (shared offset, source) pair once, for a
    partial row tile (rows past N re-read row N - 1) and partial token tiles."""
    if producer and groups != 2:
        pytest.skip("a producer hands its registers to exactly two multiplying warpgroups")
    cfg = CudaWgmmaConfig(rows, groups, tokens, 4, swizzle=swizzle, producer=producer)
    nt, block_rows = 128 if producer else 32 * cfg.warps, cfg.block_rows
    w_copies, x_copies = block_rows * 4 // nt, -(-tokens * 16 // nt)
    x_dst_step = (nt // 16) * 128 if swizzle else 16 * (nt // 16)

    def w_chunk(r, q):
        return 64 * r + 16 * (q ^ ((r >> 1) & 3))

    for n0, n, live in ((0, 10**6, tokens), (64, 64 + block_rows - 5, max(1, tokens - 3)), (0, 10**6, 1)):
        plain_w = sorted(
            (w_chunk(c >> 2, c & 3), min(n0 + (c >> 2), n - 1), c & 3) for c in range(block_rows * 4)
        )
        plain_x = sorted((x_piece(c >> 4, c & 15, tokens, swizzle), c >> 4, c & 15) for c in range(live * 16))
        plan_w, plan_x = [], []
        for tid in range(nt):
            w_row0, x_tok0 = tid >> 2, tid >> 4
            w_dst0, x_dst0 = w_chunk(w_row0, tid & 3), x_piece(x_tok0, tid & 15, tokens, swizzle)
            for u in range(w_copies):
                plan_w.append((w_dst0 + u * (nt // 4) * 64, min(n0 + w_row0 + u * (nt // 4), n - 1), tid & 3))
            for u in range(x_copies):
                if x_tok0 + u * (nt // 16) < live:
                    plan_x.append((x_dst0 + u * x_dst_step, x_tok0 + u * (nt // 16), tid & 15))
        assert sorted(plan_w) == plain_w
        assert sorted(plan_x) == plain_x


@hopper_only
@pytest.mark.parametrize("split", [2, 4, 8])
def test_gpu_wgmma_cluster_adds_like_split_k(split):
    """A cluster's blocks add their partial tiles in the order split-K's last block adds its slices: the same bits,
    for a partial row tile and a partial token tile."""
    packed = packed_weight(1000, 2048, 128, True, "cuda")
    x = torch.randn(150, 2048, device="cuda", dtype=torch.bfloat16)
    cfg = CudaWgmmaConfig(1, 2, 128, 4, split=split, depth=4)
    clustered = cuda_wgmma.gemm(x, packed, dataclasses.replace(cfg, cluster=True))
    assert torch.equal(clustered, cuda_wgmma.gemm(x, packed, cfg))
    assert rel_err(clustered, float64_product(x, packed)) < 3e-3


@hopper_only
def test_gpu_wgmma_empty_k_slices():
    """5 K-blocks in 4 slices (2, 2, 1 and an empty one) and 20 in 8 (one empty): the empty slice's zero partial is
    counted in the reduction; also through a cluster, and with a producer warpgroup (whose registers go back and
    forth around a slice with nothing to copy), and a producer with fewer K-blocks than stages."""
    for k, split in ((640, 4), (2560, 8)):
        packed = packed_weight(512, k, 128, True, "cuda")
        x = torch.randn(70, k, device="cuda", dtype=torch.bfloat16)
        for variant in ({}, {"cluster": True}, {"producer": True}):
            cfg = CudaWgmmaConfig(1, 2, 128, 4, split=split, depth=4, **variant)
            out = assert_repeatable(lambda cfg=cfg, x=x, packed=packed: cuda_wgmma.gemm(x, packed, cfg))
            assert rel_err(out, float64_product(x, packed)) < 3e-3, (k, split, variant)
    packed = packed_weight(256, 256, 128, False, "cuda")
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    cfg = CudaWgmmaConfig(2, 2, 64, 4, depth=4, producer=True)
    assert rel_err(cuda_wgmma.gemm(x, packed, cfg), float64_product(x, packed)) < 3e-3


def test_ablation_edits_still_find_their_text():
    """bench/wgmma_ablation.py takes parts of the kernel out by editing its source text, and asserts each edit found
    its text: every variant of every launch it times still builds (session 19 moved the K-block into a lambda, which
    re-indented the copy it removes)."""
    ablation = bench_module("wgmma_ablation")
    for cfg in [*ablation.BEST.values(), *ablation.CONTINUOUS.values()]:
        full = cuda_wgmma.source(cfg, 1, False, False)
        for name in ablation.VARIANTS:
            edited = ablation.variant(full, name)
            assert (edited == full) == (name == "full"), (cfg, name)


def test_chains_are_checked():
    """``chains`` (accumulators per row tile, consecutive products into different ones): 1, 2 or 4, at most the
    products in flight, and no more float32 accumulators than a lane can hold."""
    assert CudaWgmmaConfig(1, 2, 16, 4, depth=4, chains=4).chains == 4
    for bad in ({"chains": 3}, {"chains": 4, "depth": 2}, {"chains": 4, "tokens": 128, "rows": 1}):
        with pytest.raises(ValueError, match="chains"):
            CudaWgmmaConfig(**{"rows": 1, "groups": 2, "tokens": 16, "stages": 4, "depth": 4, **bad})


@hopper_only
@pytest.mark.parametrize("cfg", [CudaWgmmaConfig(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2, chains=2),
                                 CudaWgmmaConfig(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2, chains=4),
                                 CudaWgmmaConfig(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2,
                                                 late_scale=True, chains=2),
                                 CudaWgmmaConfig(2, 2, 16, 4, split=2, depth=4, late_scale=True, chains=4),
                                 CudaWgmmaConfig(1, 2, 32, 4, split=8, depth=4, chains=4),
                                 CudaWgmmaConfig(1, 2, 64, 5, split=4, depth=4, chains=2)])  # fmt: skip
def test_gpu_wgmma_chains_match_float64(cfg):
    """Several accumulators per row tile (``chains``) give the product: against float64 for grouped (symmetric and
    asymmetric, groups of 128 and 256) and per-channel weights within 3e-3, as the one-accumulator launch is, and
    bitwise repeatable eagerly and from a CUDA graph."""
    m = min(cfg.tokens, 16) + 3
    for group, asymmetric in ((128, False), (256, True), (-1, True)):
        packed = packed_weight(1000, 2816, group, asymmetric, "cuda")  # 22 K-blocks: uneven slices and shares
        x = torch.randn(m, 2816, device="cuda", dtype=torch.bfloat16)
        first = assert_repeatable(lambda p=packed, x=x: cuda_wgmma.gemm(x, p, cfg))
        assert rel_err(first, float64_product(x, packed)) < 3e-3, (group, asymmetric)
        one = cuda_wgmma.gemm(x, packed, dataclasses.replace(cfg, chains=1))
        assert rel_err(one, float64_product(x, packed)) < 3e-3
