"""Where the one-token CUDA-core GEMV's time over reading its codes goes (issue 6, session 23).

Run on one GPU:  ``python bench/m1_probe.py --out DIR [--shapes 4096x14336 down]``

Two questions, each timed for a few of the fastest one-token launches (session 22) against cuBLAS bf16 and the
read-only kernel of ``bench/cuda_gemv.py``, all in the same run:

1. The scale loads. Session 22's ablation found them 2.6 us of 13.9 on 4096x14336, yet staging the scales in shared
   memory saved nothing. Here the kernel keeps all its work and changes only the scale loads
   (``cuda_gemv.source``'s ``scale_probe``): 1, they read fixed, L1-resident addresses (wrong results: what the
   loads cost without their memory traffic); 2, they do not allocate in L1; 3, they are issued before the batch's
   weight loads. Next to ``no_math`` levels 1 and 2 (without the dot products; also without the scale loads).
2. The flush. The benchmarks' flush (``w4a16.device_time``, as ``triton.testing.do_bench``) *writes* 128 MB before
   each timed call, so the L2 is full of dirty lines that a kernel's reads must evict, and write back, first: on a
   29 MB read, up to as many bytes written as read. Each launch is also timed after a flush that only reads 128 MB
   (clean lines), and with no flush (the weight may sit in the 50 MB L2). The benchmarks keep the writing flush;
   this is a diagnosis, not a new timer.

Times are CUDA-graph replays of ``calls`` x (flush, kernel) minus the flush alone, in us.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemv import READ_ONLY, SHAPES, reference

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.layout import pack_wna16

C = cuda_gemv.CudaGemvConfig
# session 22's fastest CUDA-core launches on the 29 MB shapes (bench/notes/kernels.md) and its best with tiled scales
LAUNCHES = {
    "4096x14336": [C(2, 4, 2, 1), C(2, 8, 1, 1), C(4, 4, 1, 1, stage_scales=2)],
    "down": [C(2, 16, 1, 1, stage=True, persist=4), C(2, 16, 1, 1), C(2, 4, 2, 1)],
    "8192x28672": [C(4, 4, 1, 1, stage_scales=2), C(2, 16, 1, 1, stage=True, persist=2), C(2, 4, 2, 1)],
}
VARIANTS = [("full", {}), ("scales L1-resident", {"scale_probe": 1}), ("scales no L1 allocate", {"scale_probe": 2}),
            ("scales first", {"scale_probe": 3}), ("no math", {"no_math": 1}), ("no math, no scales", {"no_math": 2})]  # fmt: skip


def graph_time(fn, flush, calls: int = 8, samples: int = 5) -> float:
    """Median us of ``fn`` per call from CUDA-graph replays of ``calls`` x (``flush``, ``fn``), minus ``flush``."""

    def once(body) -> float:
        return w4a16.replay_time(w4a16.captured(body), calls, samples) * 1e3

    def both() -> None:
        for _ in range(calls):
            flush()
            fn()

    def alone() -> None:
        for _ in range(calls):
            flush()

    return once(both) - once(alone)


def flushes() -> dict:
    buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    words = buf.view(torch.int64)
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    return {
        "write": buf.zero_,  # as device_time and do_bench
        "read": lambda: torch.amax(words, dim=0, out=sink),
        "none": lambda: None,
    }


def shape_row(name: str, kinds: dict) -> dict:
    k, n = next((k, n) for s, k, n in SHAPES if s == name)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    del q
    ref = reference(x, packed)
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    reader = torch.cuda._compile_kernel(
        "#define NWARPS 8\n#define UNROLL 4\n" + READ_ONLY, "lowbit_read_codes"
    )

    def read() -> None:
        reader(grid=(-(-n // 8), 1, 1), block=(256, 1, 1), args=[packed.qweight, sink, n, k])

    def run(cfg: cuda_gemv.CudaGemvConfig, opts: dict):
        return lambda: cuda_gemv.gemv(x, packed, cfg, **opts)

    row = {"shape": name, "k": k, "n": n, "flush": {}}
    for kind, flush in kinds.items():
        t = {"cublas_bf16": graph_time(lambda: F.linear(x, w), flush), "read_only": graph_time(read, flush),
             "launches": []}  # fmt: skip
        for cfg in LAUNCHES[name]:
            times = {}
            for label, opts in VARIANTS:
                if cfg.stage_scales and "scale_probe" in opts:
                    continue  # staged scales take no per-batch scale loads
                fn = run(cfg, opts)
                if not opts:
                    err = ((fn().float() - ref).norm() / ref.norm()).item()
                    assert err < 1e-2, f"{cfg}: relative error {err}"
                if opts.get("scale_probe") in (2, 3):
                    assert torch.equal(fn(), cuda_gemv.gemv(x, packed, cfg)), f"{cfg} {label}: not the same"
                times[label] = graph_time(fn, flush)
            t["launches"].append({"config": cfg.__dict__, "us": times})
            print(f"{name:10s} flush {kind:5s} cuBLAS {t['cublas_bf16']:7.2f} read {t['read_only']:6.2f}  {cfg}: "
                  + "  ".join(f"{label} {us:6.2f}" for label, us in times.items()), flush=True)  # fmt: skip
        row["flush"][kind] = t
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["4096x14336", "down"], choices=list(LAUNCHES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    kinds = flushes()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for name in args.shapes:
        result["shapes"].append(shape_row(name, kinds))
        (args.out / "m1_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
