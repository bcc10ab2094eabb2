"""Kernel benchmark for issue 6: lowbit Triton kernels against cuBLAS and PyTorch's low-bit ops.

Run on one GPU (one device call):  ``python bench/kernels.py --out bench/results``

For each shape K x N and each M it times, with ``triton.testing.do_bench`` (median, L2 flushed
between repetitions, random data), cuBLAS bf16 (``F.linear``), lowbit W4A16 g128 (best of its
candidate launch configurations, and the default heuristic), ``torch._weight_int4pack_mm``,
lowbit W8A8 int8 and FP8 (dynamic per-token activation quantization included) against
``torch._int_mm`` / ``torch._scaled_mm`` alone and with a PyTorch activation quantization in
front. Each lowbit output is checked against the PyTorch reference (relative Frobenius error).
Writes ``kernels.json`` and ``kernels.md`` under ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import kernel_import  # noqa: E402,F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lowbit.kernels import w4a16, w8a8  # noqa: E402
from lowbit.kernels.layout import pack_wna16  # noqa: E402
from lowbit.kernels.reference import dequantize_weight, quantize_per_token  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
MS = [1, 4, 16, 64, 128, 512, 2048]


TIMER = {"kind": "do_bench"}


def timed(fn, rep_ms: int = 60) -> float:
    """Median microseconds of ``fn``, L2 flushed before every call.

    ``do_bench`` (default, as the issue asks) launches from Python; ``graph`` (``--timer graph``)
    replays the calls from a CUDA graph, so host-side launch cost cannot leak into the numbers.
    """
    if TIMER["kind"] == "graph":
        return timed_graph(fn)
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


_FLUSH: list[torch.Tensor] = []


def timed_graph(fn, calls: int = 20, samples: int = 7) -> float:
    """Median microseconds per call from CUDA-graph replays of ``calls`` x (L2 flush, ``fn``).

    The flush alone is captured and timed the same way and subtracted.
    """
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    flush = _FLUSH[0]
    fn()  # compile and tune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            flush.zero_()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    both, only_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(calls):
            flush.zero_()
            fn()
    with torch.cuda.graph(only_flush):
        for _ in range(calls):
            flush.zero_()
    per_call = []
    for _ in range(samples):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        both.replay()
        marks[1].record()
        only_flush.replay()
        marks[2].record()
        torch.cuda.synchronize()
        per_call.append((marks[0].elapsed_time(marks[1]) - marks[1].elapsed_time(marks[2])) / calls)
    return sorted(per_call)[len(per_call) // 2] * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ceilings() -> dict[str, float]:
    """Measured device ceilings: copy GB/s (read + write) and dense matrix rates."""
    src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 100)
    copy_gbs = 2 * src.numel() * 2 / (t * 1e-6) / 1e9
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / (timed(lambda: a @ b, 200) * 1e-6) / 1e12
    a8 = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8).t()
    int8 = 2 * n**3 / (timed(lambda: torch._int_mm(a8, b8), 200) * 1e-6) / 1e12
    af = a.to(torch.float8_e4m3fn)
    bf = b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    fp8 = (
        2
        * n**3
        / (timed(lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16), 200) * 1e-6)
        / 1e12
    )
    return {"copy_GBps": copy_gbs, "bf16_TFLOPs": bf16, "int8_TOPs": int8, "fp8_TFLOPs": fp8}


def int4pack_baseline(q: torch.Tensor, scale: torch.Tensor, group_size: int):
    """torch._weight_int4pack_mm (tinygemm) operands for the same codes: w = (q - 8) * s."""
    n, k = q.shape
    qi = q.to(torch.int32)
    packed_u8 = (qi[:, ::2] << 4 | qi[:, 1::2]).to(torch.uint8)
    wpack = torch._convert_weight_to_int4pack(packed_u8, 8)
    s = scale.t().contiguous().to(torch.bfloat16)  # [K/G, N]
    scale_zeros = torch.stack([s, torch.zeros_like(s)], -1).contiguous()  # tinygemm: (q-8)*s + z
    return lambda x: torch._weight_int4pack_mm(x, wpack, group_size, scale_zeros)


def best_of(
    fn_for_cfg, cfgs, log: dict | None = None, ref: torch.Tensor | None = None
) -> tuple[float, object]:
    """Fastest configuration whose output matches ``ref`` (rel. error < 1e-2); times go into ``log``."""
    best = (float("inf"), None)
    for cfg in cfgs:
        try:
            if ref is not None and not rel_err(fn_for_cfg(cfg), ref) < 1e-2:
                print(f"  config {cfg} is WRONG: rel. error {rel_err(fn_for_cfg(cfg), ref):.2e}", flush=True)
                continue
            t = timed(lambda cfg=cfg: fn_for_cfg(cfg), 40)
        except Exception as exc:  # a config can fail to compile (shared memory)
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        if log is not None:
            log[str(cfg)] = t
        best = min(best, (t, cfg), key=lambda p: p[0])
    return best


def bench_shape(
    k: int, n: int, ms: list[int], ceil: dict[str, float], tune: bool, w4: bool = True, w8: bool = True
) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    q4 = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16, generator=gen)
    s4 = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    p4 = pack_wna16(q4, s4, None, 4, 128)
    w4_deq = dequantize_weight(q4, s4, None, 4)  # fp32 reference weight
    tiny = int4pack_baseline(q4, s4, 128)
    w8q, w8s = quantize_per_token(w_bf16, torch.int8)
    wf8q, wf8s = quantize_per_token(w_bf16, torch.float8_e4m3fn)
    w8s_row, wf8s_row = w8s.reshape(-1), wf8s.reshape(-1)
    w8_ref, wf8_ref = w8q.float() * w8s, wf8q.float() * wf8s

    def point(m: int) -> dict:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        r = {"K": k, "N": n, "M": m}
        r["cublas_us"] = timed(lambda: F.linear(x, w_bf16))
        if w4:
            w4_point(x, r)
        if w8:
            try:
                w8a8_point(x, r)
            except Exception:
                traceback.print_exc()
        return r

    def w4_point(x: torch.Tensor, r: dict) -> None:  # W4A16 g128 symmetric
        m = x.shape[0]
        if tune:
            r["w4_all"] = {}
            r["w4_us"], cfg = best_of(
                lambda c: w4a16.wna16_matmul(x, p4, c),
                w4a16.candidate_configs(m),
                r["w4_all"],
                x.float() @ w4_deq.T,
            )
            r["w4_cfg"] = str(cfg)
        else:
            cfg = None
        r["w4_default_us"] = timed(lambda: w4a16.wna16_matmul(x, p4))
        if not tune:
            r["w4_us"] = r["w4_default_us"]
        y = w4a16.wna16_matmul(x, p4, cfg)
        r["w4_err"] = rel_err(y, x.float() @ w4_deq.T)
        try:
            r["int4pack_us"] = timed(lambda: tiny(x))
            r["int4pack_err"] = rel_err(tiny(x), x.float() @ w4_deq.T)
        except RuntimeError as exc:
            r["int4pack_us"] = float("nan")
            print("int4pack failed", exc, flush=True)
        w4_bytes = p4.qweight.numel() * 4 + p4.scale.numel() * 2 + x.numel() * 2 + m * n * 2
        r["w4_GBps"] = w4_bytes / (r["w4_us"] * 1e-6) / 1e9
        r["w4_TFLOPs"] = 2 * m * n * k / (r["w4_us"] * 1e-6) / 1e12

    def w8a8_point(x: torch.Tensor, r: dict) -> None:
        m = x.shape[0]
        for tag, wq, ws, wref in (("int8", w8q, w8s_row, w8_ref), ("fp8", wf8q, wf8s_row, wf8_ref)):
            if tune:
                log: dict = {}
                t, cfg8 = best_of(
                    lambda c, wq=wq, ws=ws: w8a8.w8a8_linear(x, wq, ws, c), w8a8.tuning_candidates(x, wq), log
                )
                r[f"{tag}_cfg"] = str(cfg8)
                r[f"{tag}_timings"] = log
                print(f"  {tag} M={m}: best {t:.2f} us {cfg8}", flush=True)
            else:
                cfg8 = None
                t = timed(lambda wq=wq, ws=ws: w8a8.w8a8_linear(x, wq, ws))
            r[f"{tag}_us"] = t
            xq, sx = quantize_per_token(x, wq.dtype)
            ref = ((xq.float() @ wref.T) * sx).to(torch.bfloat16)
            r[f"{tag}_err"] = rel_err(w8a8.w8a8_linear(x, wq, ws, cfg8), ref)
            r[f"{tag}_quant_us"] = timed(lambda wq=wq: w8a8.quantize_rows(x, wq.dtype))
            r[f"{tag}_TFLOPs"] = 2 * m * n * k / (t * 1e-6) / 1e12
        xq8, sx8 = quantize_per_token(x, torch.int8)
        try:
            r["int_mm_us"] = timed(lambda: torch._int_mm(xq8, w8q.t()))
            r["int_mm_pipeline_us"] = timed(
                lambda: (
                    torch._int_mm(quantize_per_token(x, torch.int8)[0], w8q.t())
                    .float()
                    .mul_(sx8)
                    .mul_(w8s_row)
                )
            )
        except RuntimeError:
            r["int_mm_us"] = r["int_mm_pipeline_us"] = float("nan")
        xf8, sxf8 = quantize_per_token(x, torch.float8_e4m3fn)
        sw = wf8s.reshape(1, -1).float()
        try:
            r["scaled_mm_us"] = timed(
                lambda: torch._scaled_mm(xf8, wf8q.t(), sxf8, sw, out_dtype=torch.bfloat16)
            )
            r["scaled_mm_pipeline_us"] = timed(lambda: _scaled_pipeline(x, wf8q, sw))
        except RuntimeError as exc:
            print("scaled_mm failed", exc, flush=True)
            r["scaled_mm_us"] = r["scaled_mm_pipeline_us"] = float("nan")

    def report(r: dict) -> None:
        r = with_defaults(r)
        print(
            f"K={k} N={n} M={r['M']}: cublas {r['cublas_us']:.1f}us w4 {r['w4_us']:.1f}us "
            f"({r['cublas_us'] / r['w4_us']:.2f}x, default {r['w4_default_us']:.1f}, int4pack {r['int4pack_us']:.1f}, {r['w4_GBps']:.0f} GB/s, "
            f"err {r['w4_err']:.1e}) int8 {r['int8_us']:.1f} vs int_mm {r['int_mm_us']:.1f} "
            f"fp8 {r['fp8_us']:.1f} vs scaled_mm {r['scaled_mm_us']:.1f} [{r.get('w4_cfg', '')}]",
            flush=True,
        )

    rows = []
    for m in ms:
        try:
            rows.append(point(m))
            report(rows[-1])
        except Exception:  # keep the rest of the run; the log shows what failed
            traceback.print_exc()
    torch.cuda.empty_cache()
    return rows


def _scaled_pipeline(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    xq, sx = quantize_per_token(x, torch.float8_e4m3fn)
    return torch._scaled_mm(xq, wq.t(), sx, sw, out_dtype=torch.bfloat16)


_KEYS = ("w4_us", "w4_default_us", "int4pack_us", "w4_GBps", "w4_err", "int8_us", "int_mm_us")
_KEYS += ("int_mm_pipeline_us", "fp8_us", "scaled_mm_us", "scaled_mm_pipeline_us")


def with_defaults(r: dict) -> dict:
    """Missing measurements (a failed section) read as NaN in the tables."""
    return {**dict.fromkeys(_KEYS, float("nan")), **r}


def markdown(rows: list[dict], ceil: dict[str, float]) -> str:
    lines = [
        f"Ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
        f"int8 {ceil['int8_TOPs']:.0f} TOP/s, fp8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s",
        "",
        "| K x N | M | cuBLAS us | W4 us | W4/cuBLAS | W4/int4pack | W4 GB/s | W4 err | int8 us | "
        "int8 vs _int_mm | int8 vs _int_mm+quant | fp8 us | fp8 vs _scaled_mm | fp8 vs _scaled_mm+quant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in map(with_defaults, rows):
        lines.append(
            f"| {r['K']}x{r['N']} | {r['M']} | {r['cublas_us']:.1f} | {r['w4_us']:.1f} | "
            f"{r['cublas_us'] / r['w4_us']:.2f}x | {r['int4pack_us'] / r['w4_us']:.2f}x | {r['w4_GBps']:.0f} | "
            f"{r['w4_err']:.1e} | {r['int8_us']:.1f} | {r['int_mm_us'] / r['int8_us']:.2f}x | "
            f"{r['int_mm_pipeline_us'] / r['int8_us']:.2f}x | {r['fp8_us']:.1f} | "
            f"{r['scaled_mm_us'] / r['fp8_us']:.2f}x | {r['scaled_mm_pipeline_us'] / r['fp8_us']:.2f}x |"
        )
    lines.append("")
    lines.append("Ratios are speedups (baseline time / lowbit time): above 1.00x lowbit is faster.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ms", type=int, nargs="*", default=MS)
    parser.add_argument("--shapes", type=str, nargs="*", default=[f"{k}x{n}" for k, n in SHAPES])
    parser.add_argument("--no-tune", action="store_true", help="time only the default configurations")
    parser.add_argument("--timer", choices=["do_bench", "graph"], default="do_bench")
    parser.add_argument(
        "--no-w4", action="store_true", help="leave out the W4A16 columns (W8A8 and baselines only)"
    )
    parser.add_argument("--no-w8a8", action="store_true", help="leave out the W8A8 columns")
    args = parser.parse_args()
    TIMER["kind"] = args.timer
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    ceil = ceilings()
    print(json.dumps(ceil), flush=True)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    rows: list[dict] = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        rows += bench_shape(
            k, n, args.ms, ceil, tune=not args.no_tune, w4=not args.no_w4, w8=not args.no_w8a8
        )
        (args.out / "kernels.json").write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))
    table = markdown(rows, ceil)
    (args.out / "kernels.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
