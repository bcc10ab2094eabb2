"""Does the weight stream's L2 eviction priority matter? (issue 6, session 20)

Run on one GPU:  ``python bench/l2_policy.py --out DIR [--ms 1 16 128] [--shapes 4096x14336 ...]``

The benchmark's timer (:func:`lowbit.kernels.w4a16.device_time`, as ``triton.testing.do_bench``) flushes L2 by
*writing* 128 MB before every timed call, so the timed kernel finds L2 full of dirty lines: each line its reads bring
in evicts one that must first be written back to DRAM. A 4-bit product reads a quarter of cuBLAS bf16's bytes, so
this write-back tax weighs more on it (session 4 measured 2.35x against 2.56x cuBLAS under a reading and a writing
flush). Marking the weight stream ``L2::evict_first`` (``CudaGemvConfig`` / ``CudaWgmmaConfig`` ``evict_first``)
makes L2 give up the weights' own clean lines first, so that at most the first line per set costs a write-back.
The same holds in a real decode step, where the weights, read once per token, should not push out the activations
and the KV cache.

For each shape and M, in one run: cuBLAS bf16; the read floor (a kernel that only reads the codes in the GEMV's
access pattern) without and with the hint (M = 1); every candidate launch of the CUDA GEMV (M = 1: ``bench/cuda_gemv``'s
quick sweep) or of the ``wgmma`` GEMM and the staged tensor-core GEMV (M > 1), checked against float32, then the
fastest three again, each with and without the hint, in alternation. Times are ``device_time`` minus the flush alone
(microseconds). Writes ``l2_policy.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemm import SHAPES, WRONG, rel_err
from cuda_gemv import READ_ONLY, quick_sweep

from lowbit.kernels import cuda_gemv, cuda_wgmma, w4a16
from lowbit.kernels.dequant import dequantize_packed
from lowbit.kernels.layout import pack_wna16

# the read floor's load, and the same with the weight stream's cache policy
HINTED_LOAD = (
    'asm("{ .reg .b64 pol; createpolicy.fractional.L2::evict_first.b64 pol, 1.0; '
    'ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], pol; }"'
)
PLAIN_LOAD = 'asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"'


def micros(fn, flush_ms: float) -> float:
    return (w4a16.device_time(fn) - flush_ms) * 1e3


def read_floor(packed, flush_ms: float, hinted: bool) -> float:
    """The fastest of four launch shapes of a kernel that only reads the codes (``bench/cuda_gemv.READ_ONLY``)."""
    assert READ_ONLY.count(PLAIN_LOAD) == 1, "bench/cuda_gemv.READ_ONLY's load changed"
    text = READ_ONLY.replace(PLAIN_LOAD, HINTED_LOAD) if hinted else READ_ONLY
    n, k = packed.out_features, packed.in_features
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    best = float("inf")
    for warps, unroll in ((8, 4), (4, 8), (8, 2), (16, 2)):
        kernel = torch.cuda._compile_kernel(f"#define NWARPS {warps}\n#define UNROLL {unroll}\n" + text,
                                            "lowbit_read_codes")  # fmt: skip

        def run(kernel=kernel, warps=warps) -> None:
            kernel(grid=(-(-n // 8), 1, 1), block=(32 * warps, 1, 1), args=[packed.qweight, sink, n, k])

        best = min(best, micros(run, flush_ms))
    return best


def launches(m: int) -> list:
    """The launches timed at M tokens: the CUDA GEMV's quick sweep (M = 1), else the wgmma GEMM's candidates and the
    staged tensor-core GEMV's (M <= 16)."""
    if m == 1:
        return quick_sweep(1)
    out = list(cuda_wgmma.candidates(m))
    if m <= cuda_gemv.MAX_TOKENS:
        out += [cuda_gemv.CudaGemvConfig(r, w, u, s, mma=True, stage=True)
                for r, w, u in w4a16.STAGED_MMA for s in (1, 2, 4, 8)]  # fmt: skip
    return out


def run_launch(cfg, x: torch.Tensor, packed) -> torch.Tensor:
    if isinstance(cfg, cuda_gemv.CudaGemvConfig):
        return cuda_gemv.gemv(x, packed, cfg)
    return cuda_wgmma.gemm(x, packed, cfg)


def shape_rows(name: str, k: int, n: int, ms: list[int], flush_ms: float, top: int) -> list[dict]:
    """One shape at each M in ``ms``."""
    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16, generator=gen)
    scale = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    del q
    weight = dequantize_packed(packed, torch.float32)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = x.float() @ weight.t()
        cublas = micros(lambda x=x: F.linear(x, dense), flush_ms)
        timed = []
        for cfg in launches(m):
            if (
                isinstance(cfg, cuda_gemv.CudaGemvConfig)
                and cfg.split > 1
                and (k // 128) // cfg.split < cfg.unroll
            ):
                continue
            try:
                err = rel_err(run_launch(cfg, x, packed), ref)
                if err >= WRONG:
                    print(f"  {name} M={m} {cfg}: WRONG, relative error {err:.1e}", flush=True)
                    continue
                timed.append((micros(lambda cfg=cfg, x=x: run_launch(cfg, x, packed), flush_ms), cfg))
            except (RuntimeError, ValueError) as exc:  # a launch this shape or device does not take
                print(f"  {name} M={m} {cfg}: {exc!r:.120}", flush=True)
        timed.sort(key=lambda t: t[0])
        pairs = []
        for _, cfg in timed[:top]:
            hinted = dataclasses.replace(cfg, evict_first=True)
            print(f"    hinted: {hinted}", flush=True)  # (session 20's first run died here: which launch)
            err = rel_err(run_launch(hinted, x, packed), ref)
            plain_us, hinted_us = [], []
            for _ in range(3):  # alternated, so that drift between the two is shared
                plain_us.append(micros(lambda cfg=cfg, x=x: run_launch(cfg, x, packed), flush_ms))
                hinted_us.append(micros(lambda h=hinted, x=x: run_launch(h, x, packed), flush_ms))
            pairs.append({"launch": repr(cfg), "plain_us": sorted(plain_us)[1], "hinted_us": sorted(hinted_us)[1],
                          "hinted_rel_err": err})  # fmt: skip
        row = {"shape": name, "k": k, "n": n, "m": m, "cublas_us": cublas, "pairs": pairs,
               "launches_timed": len(timed)}  # fmt: skip
        best_plain = min(p["plain_us"] for p in pairs)
        best_hinted = min(p["hinted_us"] for p in pairs)
        row.update(best_plain_us=best_plain, best_hinted_us=best_hinted)
        line = (f"{name:11s} M={m:3d} cuBLAS {cublas:7.2f}  plain {best_plain:7.2f} ({cublas / best_plain:.2f}x)  "
                f"evict_first {best_hinted:7.2f} ({cublas / best_hinted:.2f}x)")  # fmt: skip
        if m == 1:
            row["read_floor_us"] = read_floor(packed, flush_ms, hinted=False)
            row["read_floor_hinted_us"] = read_floor(packed, flush_ms, hinted=True)
            line += f"  read floor {row['read_floor_us']:.2f} -> {row['read_floor_hinted_us']:.2f}"
        print(line, flush=True)
        for p in pairs:
            print(
                f"      {p['plain_us']:7.2f} -> {p['hinted_us']:7.2f} us  err {p['hinted_rel_err']:.1e}  {p['launch']}"
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"of {list(SHAPES)}")
    parser.add_argument("--ms", type=int, nargs="*", default=[1, 16, 128], help="token counts")
    parser.add_argument(
        "--top", type=int, default=3, help="fastest plain launches timed again, with and without"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    flush_ms = w4a16.device_time(lambda: None)
    for m in args.ms:  # M = 1 (the CUDA GEMV) on every shape first
        for name in args.shapes:
            k, n = SHAPES[name]
            result["rows"] += shape_rows(name, k, n, [m], flush_ms, args.top)
            (args.out / "l2_policy.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
