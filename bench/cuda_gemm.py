"""The CUDA C tensor-core W4A16 GEMMs (:mod:`lowbit.kernels.cuda_gemm`, ``mma.sync``, and
:mod:`lowbit.kernels.cuda_wgmma`, ``wgmma``) against cuBLAS bf16 and int4pack (issue 6).

Run on one GPU:  ``python bench/cuda_gemm.py --out DIR [--kernel wgmma] [--shapes 4096x4096 ...] [--ms 16 32 64 128]``

For each shape K x N of the issue's kernel table and each token count M: cuBLAS bf16 (``F.linear``),
``torch._weight_int4pack_mm`` (g128, :func:`kernels.int4pack_baseline`) and every launch of
:func:`lowbit.kernels.cuda_gemm.candidates` (or ``cuda_wgmma.candidates``; symmetric g128 codes), each checked against a float32 reference first
(a launch off by a relative error of 1e-2 or more is flagged and never the best). Times are
:func:`lowbit.kernels.w4a16.device_time` (CUDA-graph replays with the L2 flushed) minus the flush alone, in
microseconds. Prints one line per shape and M (the best launch, its ratio to cuBLAS and to int4pack, the GB/s of
the bytes it must read) and writes ``cuda_gemm.json`` (``cuda_wgmma.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from kernels import int4pack_baseline

from lowbit.kernels import cuda_gemm, cuda_wgmma, w4a16
from lowbit.kernels.dequant import dequantize_packed
from lowbit.kernels.layout import pack_wna16

SHAPES = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336), "14336x4096": (14336, 4096),
          "8192x28672": (8192, 28672)}  # fmt: skip
KERNELS = {"mma": cuda_gemm, "wgmma": cuda_wgmma}
WRONG = 1e-2  # relative error against float32 past which a launch is flagged


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def micros(fn, flush_ms: float) -> float:
    return (w4a16.device_time(fn) - flush_ms) * 1e3


def int4pack_us(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, flush_ms: float) -> float | None:
    """``torch._weight_int4pack_mm`` on the same codes (None where this PyTorch lacks it)."""
    try:
        tiny = int4pack_baseline(q, scale.float(), 128)
        tiny(x)
        return micros(lambda: tiny(x), flush_ms)
    except Exception as exc:  # noqa: BLE001  (a PyTorch build without the op)
        print(f"  int4pack: {exc!r:.100}")
        return None


def shape_rows(name: str, k: int, n: int, ms: list[int], flush_ms: float, kernel=cuda_gemm) -> list[dict]:
    """Every M at one shape: the baselines and the candidates, fastest first."""
    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16, generator=gen)
    scale = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    weight32 = dequantize_packed(packed, torch.float32)
    dense = weight32.to(torch.bfloat16)
    read_bytes = n * k // 2 + scale.numel() * 2
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = x.float() @ weight32.t()
        cublas = micros(lambda x=x: F.linear(x, dense), flush_ms)
        int4pack = int4pack_us(q, scale, x, flush_ms)
        timed = []
        for cfg in kernel.candidates(m):
            try:
                err = rel_err(kernel.gemm(x, packed, cfg), ref)
                us = micros(lambda cfg=cfg, x=x: kernel.gemm(x, packed, cfg), flush_ms)
            except Exception as exc:  # noqa: BLE001  (a launch past this GPU's registers or shared memory)
                print(f"  {name} M={m} {cfg}: {exc!r:.160}", flush=True)
                continue
            timed.append(
                {"us": us, "rel_err": err, "wrong": err >= WRONG, "config": cfg.__dict__, "launch": str(cfg)}
            )
        timed.sort(key=lambda t: t["us"])
        good = [t for t in timed if not t["wrong"]]
        best = good[0] if good else None
        row = {"shape": name, "k": k, "n": n, "m": m, "cublas_bf16_us": cublas, "int4pack_us": int4pack,
               "best": best, "wrong": len(timed) - len(good), "launches": timed}  # fmt: skip
        rows.append(row)
        if best is None:
            print(
                f"{name:11s} M={m:3d}: every launch WRONG {[round(t['rel_err'], 4) for t in timed]}",
                flush=True,
            )
            continue
        us = best["us"]
        gbps = (read_bytes + 2 * m * (k + n)) / us / 1e3
        vs_int4 = f"{int4pack / us:.2f}x int4pack ({int4pack:.2f} us)" if int4pack else "int4pack n/a"
        print(f"{name:11s} M={m:3d}: best {us:8.2f} us  {cublas / us:.2f}x cuBLAS ({cublas:.2f} us)  {vs_int4}  "
              f"{gbps:5.0f} GB/s  err {best['rel_err']:.1e}  wrong {row['wrong']}  {best['launch']}",
              flush=True)  # fmt: skip
        for t in timed[1:4]:
            print(f"      {t['us']:8.2f} us  err {t['rel_err']:.1e}  {t['launch']}")
        variants = variant_bests(good)
        if len(variants) > 1:
            print("      best per variant: " + ", ".join(f"{v} {us:.2f} us" for v, us in variants.items()))
    return rows


def variant_bests(timed: list[dict]) -> dict[str, float]:
    """The fastest time of each kernel variant among ``timed`` (the wgmma GEMM's swizzled and unswizzled layouts, with
    split-K, stream-K (continuous or not, 1 or 2 workers per SM), split-K through a cluster, or a producer warpgroup), so that a variant's gain reads off one
    line."""
    best: dict[str, float] = {}
    for t in timed:
        c = t["config"]
        layout = "swizzled" if c.get("swizzle", True) else "unswizzled"
        key = layout + "".join(
            f" {flag}"
            for flag in ("stream", "continuous", "cluster", "producer", "late_scale")
            if c.get(flag)
        )
        key += " 2/SM" if c.get("per_sm", 1) > 1 else ""
        best[key] = min(best.get(key, float("inf")), t["us"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"of {list(SHAPES)}")
    parser.add_argument("--ms", type=int, nargs="*", default=[16, 32, 64, 128], help="token counts")
    parser.add_argument("--kernel", choices=list(KERNELS), default="mma")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    flush_ms = w4a16.device_time(lambda: None)
    for name in args.shapes:
        k, n = SHAPES[name]
        result["rows"] += shape_rows(name, k, n, args.ms, flush_ms, KERNELS[args.kernel])
        (args.out / f"cuda_{'gemm' if args.kernel == 'mma' else 'wgmma'}.json").write_text(
            json.dumps(result, indent=1)
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
