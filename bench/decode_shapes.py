"""The decode step's own kernels, one by one (issue 6): every timed launch of the W4A16 GEMV at the
Llama-3-8B decode shapes, and a sweep of the decode-attention kernel's launch parameters.

Run on one GPU:  ``python bench/decode_shapes.py --out DIR``

Times are device times from CUDA-graph replays (:func:`lowbit.kernels.w4a16.device_time`, the tuner's
own timer) minus the same graph with the L2 flush alone, so they are what the kernel costs inside the
decode step's graph. GB/s counts the bytes the kernel must read (packed codes, scales, activations).
cuBLAS bf16 on the same shape, timed the same way, is the baseline.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F

from lowbit.kernels import w4a16
from lowbit.kernels.attention import decode_attention
from lowbit.kernels.layout import pack_wna16

# (name, K, N) of the Llama-3-8B decode step with fused projections
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
          ("lm_head", 4096, 128256)]  # fmt: skip


def flush_only() -> float:
    return w4a16.device_time(lambda: None)


def gemv_rows(top: int, ms: list[int]) -> list[dict]:
    rows = []
    base = flush_only()
    for (name, k, n), m in ((shape, m) for m in ms for shape in SHAPES):
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
        packed = pack_wna16(q, scale, None, 4, 128)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        cublas_us = (w4a16.device_time(lambda x=x, w=w: F.linear(x, w)) - base) * 1e3
        del w
        w4a16.tuned_config(x, packed)
        key = next(key for key in w4a16.TUNING_LOG if key[:3] == (m, n, k))
        read = n * k // 2 + scale.numel() * 2 + m * k * 2
        timed = [
            {"us": (ms - base) * 1e3, "gb_s": read / ((ms - base) * 1e-3) / 1e9, "config": repr(cfg)}
            for ms, cfg in w4a16.TUNING_LOG[key]
        ]
        row = {"shape": name, "m": m, "k": k, "n": n, "cublas_bf16_us": cublas_us, "candidates": len(timed),
               "best_us": timed[0]["us"], "ratio_vs_cublas": cublas_us / timed[0]["us"], "top": timed[:top]}  # fmt: skip
        print(f"{name:8s} M={m:2d} K={k:6d} N={n:6d}  cuBLAS {cublas_us:7.2f} us  lowbit {timed[0]['us']:7.2f} us "
              f"({timed[0]['gb_s']:5.0f} GB/s, {row['ratio_vs_cublas']:.2f}x)")  # fmt: skip
        for entry in timed[:top]:
            print(f"    {entry['us']:7.2f} us {entry['gb_s']:6.0f} GB/s  {entry['config']}")
        rows.append(row)
    return rows


def attention_rows(lengths: list[int]) -> list[dict]:
    rows = []
    base = flush_only()
    b, h, kv, d = 1, 32, 8, 128
    for length in lengths:
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
        k_cache = torch.randn(b, kv, length, d, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn(b, kv, length, d, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor([length - 1], device="cuda")
        expected = decode_attention(q, k_cache, v_cache, pos, split=1).float()
        read = 2 * kv * length * d * 2
        timed = []
        for split in (1, 2, 4, 8, 16, 32):
            for block_l in (16, 32, 64, 128):
                if split * block_l > length:
                    continue
                for warps in (1, 2, 4, 8):
                    run = partial(decode_attention, q, k_cache, v_cache, pos, split, block_l, warps)
                    try:
                        err = (run().float() - expected).abs().max().item()
                        us = (w4a16.device_time(run) - base) * 1e3
                    except Exception as exc:  # out of registers or shared memory for this launch
                        print(f"  L={length} split={split} block_l={block_l} warps={warps}: {exc!r:.80}")
                        continue
                    timed.append({"us": us, "split": split, "block_l": block_l, "warps": warps, "max_err": err})
        timed.sort(key=lambda t: t["us"])
        default = next((t for t in timed if t["block_l"] == 64 and t["warps"] == 4 and t["split"] == 4), None)
        print(f"attention L={length}: {len(timed)} launches, read floor {read / 4.0e12 * 1e6:.2f} us at 4 TB/s; "
              f"default (4, 64, 4) {default['us'] if default else float('nan'):.2f} us")  # fmt: skip
        for entry in timed[:8]:
            print(f"    {entry['us']:6.2f} us  split={entry['split']:2d} block_l={entry['block_l']:3d} "
                  f"warps={entry['warps']}  max err {entry['max_err']:.1e}")  # fmt: skip
        rows.append({"length": length, "read_bytes": read, "top": timed[:16], "all": len(timed)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="*", default=[641, 4097])
    parser.add_argument("--skip-gemv", action="store_true")
    parser.add_argument("--ms", type=int, nargs="*", default=[1], help="tokens per GEMV (decode batch sizes)")
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_gemv:
        result["gemv"] = gemv_rows(args.top, args.ms)
    if not args.skip_attention:
        result["attention"] = attention_rows(args.lengths)
    (args.out / "decode_shapes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
