"""The persistent tensor-core GEMV (``CudaGemvConfig(mma=True, stage=True, persist=P)``) at 2-16 tokens against the
runtime's tuned launch and cuBLAS bf16 (issue 6, the M = 16 >= 2.5x target).

Run on one GPU:  ``python bench/m16_persist.py --out DIR [--ms 16] [--shapes 4096x14336 down 8192x28672]``

Every launch is checked against a float32 reference first (relative error < 1e-2; a launch that fails is reported,
not timed). Times are CUDA-graph replays with a writing 128 MB flush before each call, minus the flush alone
(bench/m1_probe.py). Writes ``m16_persist.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemv import SHAPES, reference
from m1_probe import graph_time

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.layout import pack_wna16

C = cuda_gemv.CudaGemvConfig


def launches(k: int, m: int) -> list[cuda_gemv.CudaGemvConfig]:
    """Persistent launches whose staged K-slice fits: 8 or 16 warps, 1-4 tiles in flight, the fewest slices that
    fit and twice as many, one or two blocks per SM."""
    out = []
    device = torch.device("cuda")
    for warps, pipes in ((16, (2, 3)), (8, (2, 3, 4))):
        fitting = [
            s for s in (1, 2, 4, 8) if cuda_gemv.stage_fits(C(1, warps, 1, s, True, True, 1), k, device, m)
        ]
        for split in fitting[:2]:
            for pipe in pipes:
                for per_sm in (1, 2):
                    cfg = C(1, warps, 1, split, mma=True, stage=True, persist=per_sm, pipe=pipe)
                    if per_sm == 2 and 2 * (cuda_gemv.staged_bytes(cfg, k, m) + 2048) > 227 * 1024:
                        continue
                    out.append(cfg)
    return out


def shape_row(name: str, m: int, flush) -> dict:
    k, n = next((k, n) for s, k, n in SHAPES if s == name)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    del q
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    cublas = graph_time(lambda: F.linear(x, w), flush)
    w = None  # the bf16 weight is not needed past here
    ref = reference(x, packed)
    tuned = w4a16.tuned_config(x, packed)
    row = {"shape": name, "k": k, "n": n, "m": m, "cublas_bf16": cublas, "tuned": str(tuned),
           "tuned_us": graph_time(lambda: w4a16.wna16_matmul(x, packed, tuned), flush), "launches": []}  # fmt: skip
    print(f"{name} M={m}: cuBLAS {cublas:.2f} us, tuned {row['tuned_us']:.2f} us ({tuned})", flush=True)
    for cfg in launches(k, m):
        entry = {"config": cfg.__dict__}
        try:
            out = cuda_gemv.gemv(x, packed, cfg)
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            entry["err"] = err
            if not err < 1e-2:
                print(f"  WRONG {cfg}: relative error {err}", flush=True)
                row["launches"].append(entry)
                continue
            again = cuda_gemv.gemv(x, packed, cfg)
            entry["repeatable"] = bool(torch.equal(out, again))
            entry["us"] = graph_time(lambda cfg=cfg: cuda_gemv.gemv(x, packed, cfg), flush)
        except Exception as exc:  # a launch that does not build or run is reported
            entry["error"] = repr(exc)[:300]
            print(f"  FAILED {cfg}: {entry['error']}", flush=True)
            row["launches"].append(entry)
            continue
        row["launches"].append(entry)
        print(f"  warps {cfg.warps:2d} split {cfg.split} pipe {cfg.pipe} per SM {cfg.persist}: {entry['us']:7.2f} us "
              f"({cublas / entry['us']:.2f}x cuBLAS, tuned {row['tuned_us'] / entry['us']:.2f}x) err {err:.1e}"
              f"{'' if entry['repeatable'] else ' NOT REPEATABLE'}", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["4096x14336", "down", "8192x28672"])
    parser.add_argument("--ms", type=int, nargs="+", default=[16])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for m in args.ms:
        for name in args.shapes:
            result["rows"].append(shape_row(name, m, buf.zero_))
            (args.out / "m16_persist.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
