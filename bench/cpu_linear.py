"""lowbit's quantized products on the CPU against a dense bf16 ``torch.matmul`` measured in the same run.

Rows: W4A16 (group 128, or 64 where 128 does not divide K) through torch's CPU int4 kernel and through the
dequantizing reference (``--no-dequantizing`` leaves it out: at 4096 x 14336 it takes about a second a call),
W8A16 (same groups) as two 4-bit planes through the int4 kernel, and W8A8 int8 through ``torch._int_mm``, dynamic per-token quantization of the activations included. Median of
``--reps`` calls after two warm-up calls; random data.

    python bench/cpu_linear.py --threads 2 --ms 1 16 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import kernel_import  # noqa: F401  (puts src/ on the path)
import torch

from lowbit.kernels import cpu
from lowbit.kernels.layout import pack_wna16
from lowbit.kernels.reference import quantize_per_channel, w8a8_matmul_reference

SHAPES = [(576, 1536), (1536, 576), (576, 49152), (4096, 4096), (4096, 14336), (14336, 4096)]  # K x N


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def median_ms(reps: int, fn, *args) -> float:
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-dequantizing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads\n")
    print("| K x N | M | dense bf16 ms | W4 int4 kernel ms | vs dense | W4 dequantizing ms | W8A16 ms | vs dense "
          "| W8A8 int8 ms | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors: dict[str, float] = {}
    for k, n in SHAPES:
        group = 128 if k % 128 == 0 else 64
        q = torch.randint(0, 16, (n, k), dtype=torch.int16)
        scale = (torch.rand(n, k // group) * 0.004 + 0.001).to(torch.bfloat16)
        packed = pack_wna16(q, scale, None, 4, group)
        int4 = cpu.prepare_int4_cpu(packed, torch.bfloat16)
        q8 = torch.randint(0, 256, (n, k), dtype=torch.int16)
        packed8 = pack_wna16(q8, scale, None, 8, group)
        int8_planes = cpu.prepare_int4_cpu(packed8, torch.bfloat16)
        dense = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        w8, w8_scale = quantize_per_channel(dense.float(), torch.int8)
        w8_scale = w8_scale.reshape(-1)
        # correctness first, on 4 tokens, against float64: the largest relative error of the three fast products
        x = torch.randn(4, k, dtype=torch.bfloat16)
        errors[f"{k}x{n}"] = max(
            rel_err(cpu.int4_mm_cpu(x, int4), x.double() @ cpu.dequantize_packed(packed).double().T),
            rel_err(cpu.int4_mm_cpu(x, int8_planes), x.double() @ cpu.dequantize_packed(packed8).double().T),
            rel_err(cpu.w8a8_int8_mm_cpu(x, w8, w8_scale), w8a8_matmul_reference(x.double(), w8, w8_scale)),
        )
        for m in args.ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            t_dense = median_ms(args.reps, torch.matmul, x, dense.T)
            t_int4 = median_ms(args.reps, cpu.int4_mm_cpu, x, int4)
            t_deq = float("nan")
            if not args.no_dequantizing:
                t_deq = median_ms(max(2, args.reps // 5), cpu.wna16_matmul_cpu, x, packed)
            t_w8 = median_ms(args.reps, cpu.int4_mm_cpu, x, int8_planes)
            t_int8 = median_ms(args.reps, cpu.w8a8_int8_mm_cpu, x, w8, w8_scale)
            print(f"| {k}x{n} | {m} | {t_dense:.3f} | {t_int4:.3f} | {t_dense / t_int4:.2f}x | {t_deq:.2f} | "
                  f"{t_w8:.3f} | {t_dense / t_w8:.2f}x | {t_int8:.3f} | {t_dense / t_int8:.2f}x |", flush=True)  # fmt: skip
    print("\nLargest relative error against float64 (W4, W8A16 and W8A8 int8 at 4 tokens; W8A8 against its reference's"
          " own quantized activations):", ", ".join(f"{shape} {e:.1e}" for shape, e in errors.items()))


if __name__ == "__main__":
    main()
