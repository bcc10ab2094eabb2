"""Every W8A8 TMA launch of the tuner's candidates against the pointer kernel with the same tiles (GPU): int8 should
be equal bit for bit (exact int32 sums), fp8 as close to the exact product. Prints one line per launch and exits 1
if an int8 launch differs or an fp8 one is more than twice the pointer kernel's error."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import triton

from lowbit.kernels import w8a8
from lowbit.kernels.reference import quantize_per_channel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="*", default=[128, 512, 2048])
    parser.add_argument("--shapes", nargs="*", default=["4096x4096", "14336x4096"])
    args = parser.parse_args()
    failed = 0
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        for dtype in (torch.int8, torch.float8_e4m3fn):
            wq, w_scale = quantize_per_channel(torch.randn(n, k, device="cuda"), dtype)
            for m in args.ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, sx = w8a8.quantize_rows(x, dtype)
                exact = (xq.double() @ wq.double().T) * sx.double()[:, None] * w_scale.double().T
                for cfg in w8a8.candidate_configs(m, tma=True):
                    if not cfg.tma:
                        continue
                    pointer = w8a8.w8a8_gemm(
                        xq,
                        sx,
                        wq,
                        w_scale[:, 0],
                        torch.float32,
                        dataclasses.replace(cfg, tma=False, persistent=False),
                    )
                    try:
                        out = w8a8.w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, cfg)
                    except triton.runtime.errors.OutOfResources as exc:
                        print(f"{shape} M={m} {dtype} {cfg}: does not fit ({exc})", flush=True)
                        continue
                    diff = (out - pointer).abs()
                    err = ((out.double() - exact).norm() / exact.norm()).item()
                    perr = ((pointer.double() - exact).norm() / exact.norm()).item()
                    bad = (diff > 0).nonzero()
                    bad_launch = len(bad) > 0 if dtype == torch.int8 else err > max(2 * perr, 1e-6)
                    failed += bad_launch
                    where = f"first at {tuple(bad[0].tolist())}, {len(bad)} differ" if len(bad) else "equal"
                    print(
                        f"{shape} M={m} {dtype} {cfg}: max diff {diff.max().item():.3g}, {where}; "
                        f"err {err:.2e} (pointer {perr:.2e})",
                        flush=True,
                    )
    print(f"{failed} launches wrong", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
