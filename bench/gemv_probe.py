"""Diagnostic for the W4 GEMV (issue 6): how fast can the packed weight merely be *read*?

Run on one GPU:  ``python bench/gemv_probe.py``

For each benchmark shape it times, with ``do_bench`` (median, L2 flushed): (a) a Triton kernel
that reads the packed 4-bit weight with the multi-block GEMV's own tile pattern and only XORs the
words (no dequantization, no activations), (b) a flat contiguous read of the same bytes, and (c)
the tuned lowbit GEMV and cuBLAS bf16 at M=1. If (a) is as slow as the GEMV, the layout's access
pattern is the ceiling; if (a) is near (b), the GEMV's arithmetic or latency is.
"""

from __future__ import annotations

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from lowbit.kernels import w4a16
from lowbit.kernels.dequant import pack_bf16x2, word_dot_bf16x2
from lowbit.kernels.layout import pack_wna16
from lowbit.kernels.reference import dequantize_weight

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no host-side TMA descriptors
    TensorDescriptor = None

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


@triton.jit
def _tile_read(qw_ptr, out_ptr, N, NUM_KB, BLOCK_N: tl.constexpr, KBI: tl.constexpr, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, KBI)
    offs_w = tl.arange(0, WORDS)
    off = offs_i[None, :, None] * (N * WORDS) + offs_n[:, None, None] * WORDS + offs_w[None, None, :]
    acc = tl.zeros((BLOCK_N, KBI, WORDS), dtype=tl.int32)
    for step in range(0, NUM_KB // KBI):
        acc ^= tl.load(qw_ptr + step * (KBI * N * WORDS) + off)
    tl.store(out_ptr + offs_n, tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1))


@triton.jit
def _tma_read(desc, out_ptr, NUM_KB, BLOCK_N: tl.constexpr, KBI: tl.constexpr, WORDS: tl.constexpr):
    """The tile read through a TMA descriptor over ``qweight`` [num_kb, N, WORDS]; Triton pipelines it (num_stages)."""
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    acc = tl.zeros((KBI, BLOCK_N, WORDS), dtype=tl.int32)
    for step in range(0, NUM_KB // KBI):
        acc ^= desc.load([step * KBI, n0, 0])
    tl.store(out_ptr + n0 + tl.arange(0, BLOCK_N), tl.xor_sum(tl.xor_sum(acc, axis=2), axis=0))


@triton.jit
def _tma_gemv(
    desc, x_ptr, s_ptr, out_ptr, N, NUM_KB, BLOCK_N: tl.constexpr, KBI: tl.constexpr, WORDS: tl.constexpr
):
    """The packed-bf16x2 W4 g128 symmetric GEMV with its words brought in by TMA (probe: N, K tile-aligned)."""
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, KBI)
    x_off = offs_i[:, None] * (WORDS * 8) + tl.arange(0, WORDS)[None, :]
    shape: tl.constexpr = (KBI, BLOCK_N, WORDS)
    nz = tl.broadcast_to(
        pack_bf16x2(tl.full((1, 1, 1), -136.0, tl.float32), tl.full((1, 1, 1), -136.0, tl.float32)), shape
    )
    acc = tl.zeros(shape, dtype=tl.float32)
    for step in range(0, NUM_KB // KBI):
        words = desc.load([step * KBI, n0, 0])
        scale = tl.load(s_ptr + (step * KBI + offs_i)[:, None] * N + offs_n[None, :]).to(tl.float32)
        xb = x_ptr + step * (KBI * WORDS * 8) + x_off
        x0 = tl.load(xb + 0 * WORDS)
        x1 = tl.load(xb + 1 * WORDS)
        x2 = tl.load(xb + 2 * WORDS)
        x3 = tl.load(xb + 3 * WORDS)
        x4 = tl.load(xb + 4 * WORDS)
        x5 = tl.load(xb + 5 * WORDS)
        x6 = tl.load(xb + 6 * WORDS)
        x7 = tl.load(xb + 7 * WORDS)
        part = word_dot_bf16x2(
            words,
            tl.broadcast_to(pack_bf16x2(x0, x4)[:, None, :], shape),
            tl.broadcast_to(pack_bf16x2(x1, x5)[:, None, :], shape),
            tl.broadcast_to(pack_bf16x2(x2, x6)[:, None, :], shape),
            tl.broadcast_to(pack_bf16x2(x3, x7)[:, None, :], shape),
            nz,
        )
        acc += part * scale[:, :, None]
    tl.store(out_ptr + offs_n, tl.sum(tl.sum(acc, axis=2), axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _flat_read(ptr, out_ptr, n_words, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(PER_PROGRAM):
        acc ^= tl.load(ptr + (pid * PER_PROGRAM + i) * BLOCK + offs)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def us(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


_FLUSH: list[torch.Tensor] = []


def us_flushed(fn, flush: str, reps: int = 60) -> float:
    """Median microseconds of ``fn`` after an L2 flush that either writes 256 MB (``dirty``: ``zero_()``, what
    ``do_bench`` does, which leaves L2 full of dirty lines that the timed kernel's reads must write back) or only
    reads 256 MB (``clean``: a sum, so L2 holds clean lines and the timed reads evict them for free)."""
    if not _FLUSH:
        _FLUSH.append(torch.ones(256 * 2**20, dtype=torch.int8, device="cuda"))
    buffer = _FLUSH[0]
    fn()
    times = []
    for _ in range(reps):
        if flush == "dirty":
            buffer.zero_()
        else:
            buffer.sum(dtype=torch.int32)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in times)[reps // 2] * 1e3


def flush_effect() -> None:
    """cuBLAS, the tuned lowbit GEMV and the tile read at M=1 under both flushes (same run)."""
    print("| K x N | flush | cuBLAS bf16 us | lowbit W4 us | W4 / cuBLAS | tile read us (GB/s) |")
    print("|---|---|---|---|---|---|")
    for k, n in SHAPES:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        s = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        p = pack_wna16(q, s, None, 4, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(n, dtype=torch.int32, device="cuda")
        num_kb, mb = p.qweight.shape[0], p.qweight.numel() * 4 / 1e6
        for flush in ("dirty", "clean"):
            t_cublas = us_flushed(lambda x=x, w=w: F.linear(x, w), flush)
            t_w4 = us_flushed(lambda x=x, p=p: w4a16.wna16_matmul(x, p), flush)
            t_read = min(
                us_flushed(
                    lambda g=(triton.cdiv(n, bn),), q=p.qweight, o=out, n=n, kb=num_kb, bn=bn, kbi=kbi, nw=nw: (
                        _tile_read[g](q, o, n, kb, bn, kbi, 16, num_warps=nw)
                    ),
                    flush,
                )
                for bn, kbi, nw in [(16, 16, 8), (32, 4, 4), (8, 16, 4)]
                if num_kb % kbi == 0
            )
            print(
                f"| {k}x{n} | {flush} | {t_cublas:.1f} | {t_w4:.1f} | {t_cublas / t_w4:.2f}x | "
                f"{t_read:.1f} ({mb * 1e3 / t_read:.0f}) |",
                flush=True,
            )


def main() -> None:
    if "--flush-effect" in __import__("sys").argv:
        flush_effect()
        return
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    print(
        "| K x N | MB | cuBLAS bf16 us | lowbit GEMV us (GB/s) | tile read us (GB/s), best config | flat read us (GB/s) |"
    )
    print("|---|---|---|---|---|---|")
    for k, n in SHAPES:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        s = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        p = pack_wna16(q, s, None, 4, 128)
        mb = p.qweight.numel() * 4 / 1e6
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t_cublas = us(lambda x=x, w=w: F.linear(x, w))
        w4a16.wna16_matmul(x, p)  # tune
        t_gemv = us(lambda x=x, p=p: w4a16.wna16_matmul(x, p))
        num_kb = p.qweight.shape[0]
        best = (float("inf"), None)
        for bn, kbi, warps in [
            (16, 8, 4),
            (16, 4, 4),
            (32, 4, 4),
            (8, 16, 4),
            (32, 8, 8),
            (64, 4, 8),
            (16, 16, 8),
        ]:
            if num_kb % kbi:
                continue
            out = torch.empty(n, dtype=torch.int32, device="cuda")
            grid = (triton.cdiv(n, bn),)
            t = us(
                lambda g=grid, q=p.qweight, o=out, n=n, kb=num_kb, bn=bn, kbi=kbi, nw=warps: _tile_read[g](
                    q, o, n, kb, bn, kbi, 16, num_warps=nw
                )
            )
            best = min(best, (t, (bn, kbi, warps)), key=lambda b: b[0])
        tma = tma_gemv = (float("inf"), None)
        if TensorDescriptor is not None:
            triton.set_allocator(
                lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda")
            )
            ref = x.float() @ dequantize_weight(q, s, None, 4).T
            for bn, kbi, warps, stages in [
                (16, 8, 4, 3),
                (16, 8, 4, 4),
                (32, 4, 4, 3),
                (32, 8, 8, 3),
                (16, 16, 8, 3),
                (64, 4, 8, 3),
                (32, 16, 8, 2),
                (8, 16, 4, 4),
            ]:
                if num_kb % kbi or n % bn:
                    continue
                try:
                    desc = TensorDescriptor.from_tensor(p.qweight, [kbi, bn, 16])
                    out = torch.empty(n, dtype=torch.int32, device="cuda")
                    t = us(
                        lambda g=(n // bn,), d=desc, o=out, kb=num_kb, bn=bn, kbi=kbi, nw=warps, st=stages: (
                            _tma_read[g](d, o, kb, bn, kbi, 16, num_warps=nw, num_stages=st)
                        )
                    )
                    tma = min(tma, (t, (bn, kbi, warps, stages)), key=lambda b: b[0])
                    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")

                    def run(
                        g=(n // bn,),
                        d=desc,
                        x=x,
                        s=p.scale,
                        y=y,
                        n=n,
                        kb=num_kb,
                        bn=bn,
                        kbi=kbi,
                        nw=warps,
                        st=stages,
                    ):
                        _tma_gemv[g](d, x, s, y, n, kb, bn, kbi, 16, num_warps=nw, num_stages=st)

                    run()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    if err < 1e-2:
                        tma_gemv = min(tma_gemv, (us(run), (bn, kbi, warps, stages)), key=lambda b: b[0])
                    else:
                        print(f"  TMA GEMV {bn, kbi, warps, stages} wrong: rel. error {err:.2e}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                    print(
                        f"  TMA {bn, kbi, warps, stages} failed: {type(exc).__name__}: {str(exc)[:200]}",
                        flush=True,
                    )
        print(
            f"  {k}x{n}: TMA read {tma[0]:.1f} us ({mb * 1e3 / tma[0]:.0f} GB/s) {tma[1]}; "
            f"TMA GEMV {tma_gemv[0]:.1f} us ({mb * 1e3 / tma_gemv[0]:.0f} GB/s, {t_cublas / tma_gemv[0]:.2f}x cuBLAS) "
            f"{tma_gemv[1]}",
            flush=True,
        )
        flat = p.qweight.reshape(-1)
        block, per = 1024, 16
        programs = flat.numel() // (block * per)
        out = torch.empty(programs, dtype=torch.int32, device="cuda")
        t_flat = us(
            lambda g=(programs,), f=flat, o=out: _flat_read[g](f, o, f.numel(), 1024, 16, num_warps=4)
        )
        flat_mb = programs * block * per * 4 / 1e6
        print(
            f"| {k}x{n} | {mb:.1f} | {t_cublas:.1f} | {t_gemv:.1f} ({mb * 1e3 / t_gemv:.0f}) | "
            f"{best[0]:.1f} ({mb * 1e3 / best[0]:.0f}), {best[1]} | {t_flat:.1f} ({flat_mb * 1e3 / t_flat:.0f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
