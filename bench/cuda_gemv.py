"""The CUDA C GEMV (:mod:`lowbit.kernels.cuda_gemv`) against the Triton GEMV and cuBLAS at the decode shapes (issue 6).

Run on one GPU:  ``python bench/cuda_gemv.py --out DIR [--seed-triton bench/notes/decode_tuned_h200_session10.json]``

For each Llama-3-8B decode shape at one token: every CUDA launch shape in the sweep (checked against a float32
reference first), the Triton launch the seed file names (the tuned one of an earlier session; else the tuner runs),
cuBLAS bf16, and a CUDA kernel that only reads the packed codes with the GEMV's own access pattern (the read floor
of this access pattern). Times are :func:`lowbit.kernels.w4a16.device_time` (CUDA-graph replays with the L2 flushed)
minus the flush alone. Writes ``cuda_gemv.json`` and ``cuda_tuned.json``: the faster of the seeded Triton launch and
the best CUDA launch per shape, in the format ``bench/decode_profile.py --tuned`` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from decode_profile import load_tuned
from kernels import int4pack_baseline

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.dequant import dequantize_packed
from lowbit.kernels.layout import pack_wna16

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
          ("lm_head", 4096, 128256), ("4096x14336", 4096, 14336), ("8192x28672", 8192, 28672)]  # fmt: skip
# the decode shapes by default; the kernel-table shapes (K x N) not among them by name
DEFAULT_SHAPES = ["qkv", "o", "gate_up", "down", "lm_head"]

READ_ONLY = r"""
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
lowbit_read_codes(const uint4* __restrict__ qweight, unsigned* __restrict__ sink, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int quad = lane & 3, row = lane >> 2;
    const int n = min(blockIdx.x * 8 + row, N - 1);
    const int num_kb = K >> 7;
    unsigned acc = 0;
    for (int kb0 = warp; kb0 < num_kb; kb0 += NWARPS * UNROLL) {
        uint4 words[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * NWARPS;
            if (kb < num_kb) {
                asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                    : "=r"(words[u].x), "=r"(words[u].y), "=r"(words[u].z), "=r"(words[u].w)
                    : "l"(qweight + ((size_t)kb * N + n) * 4 + quad));
            } else {
                words[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= words[u].x ^ words[u].y ^ words[u].z ^ words[u].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}
"""


# --quick: the CUDA-core launches near session 13's best (one K-slice; unstaged, or staged with one block per tile or
# 1 to 4 persistent blocks per SM), and the tensor-core launches that placed
QUICK_CORE = [(1, 8, 1), (2, 8, 1), (2, 16, 1), (2, 4, 2), (4, 4, 1), (1, 16, 1)]
QUICK_LAUNCHES = [(False, 0)] + [(True, p) for p in (0, 1, 2, 3, 4)]  # (stage, persist)
# --stage-scales: the CUDA-core launches with the tiles' scales staged in shared memory (CudaGemvConfig.stage_scales:
# 0 none, 1 from the packed scales, 2 from the tiled copy)
STAGE_SCALES = [0, 1, 2]
# --mma-at-one (with --quick): at one token, the tensor-core launches, staged ones included (the tuner's candidates
# take the staged kernel from two tokens on)
MMA_AT_ONE = [False]
# --half: the staged CUDA-core launches in bf16 pairs (False), fp16 pairs (True, CudaGemvConfig.half) or both
HALF = [False, True]


def halves(stage: bool) -> list[bool]:
    """The arithmetics a CUDA-core launch is timed in: fp16 only exists staged."""
    return HALF if stage else [False]


def staged_mma() -> list[cuda_gemv.CudaGemvConfig]:
    """The staged tensor-core kernel's launches: the tuner's (w4a16.STAGED_MMA x split 1 to 8), and with 2 or 3 load
    batches in flight per warp (``pipe``, not among the tuner's candidates until measured)."""
    return [
        cuda_gemv.CudaGemvConfig(r, w, u, s, mma=True, stage=True, pipe=p)
        for r, w, u in w4a16.STAGED_MMA
        for s in (1, 2, 4, 8)
        for p in (1, 2, 3)
        if u * p <= 4
    ]


def quick_sweep(m: int, mma_only: bool = False) -> list[cuda_gemv.CudaGemvConfig]:
    if m == 1 and mma_only:  # --mma-at-one: the tensor-core kernels at one token, next to three CUDA-core launches
        C = cuda_gemv.CudaGemvConfig
        core = [C(2, 4, 2, 1), C(2, 16, 1, 1, stage=True, persist=4), C(4, 4, 1, 1, stage_scales=2)]
        unstaged = [C(r, w, 1, s, mma=True) for r, w in ((1, 4), (2, 4), (2, 8), (4, 4), (1, 8)) for s in (1, 2)]
        return core + unstaged + staged_mma()
    if m > 1:  # the tensor-core kernels, unstaged (split 1 to 4) and staged
        unstaged = [
            cuda_gemv.CudaGemvConfig(r, w, 1, s, mma=True)
            for r, w in ((1, 4), (2, 4), (2, 8))
            for s in (1, 2, 4)
        ]
        return unstaged + staged_mma()
    return [
        cuda_gemv.CudaGemvConfig(r, w, u, 1, stage=st, persist=p, stage_scales=ss, half=h)
        for r, w, u in QUICK_CORE
        for st, p in QUICK_LAUNCHES
        for ss in STAGE_SCALES
        for h in halves(st)
    ] + [cuda_gemv.CudaGemvConfig(r, w, 1, 1, mma=True) for r, w in ((1, 4), (2, 4), (2, 8))]


def sweep() -> list[cuda_gemv.CudaGemvConfig]:
    """Both kernels' launch shapes (session 13, calls 1-2: the best were unroll 1-2, rows 1-4, split 1 at every
    shape; unroll 4 and 8 never placed): the CUDA-core kernel with and without staging, staged with 1 to 4
    persistent blocks per SM, the tensor-core one."""
    core = [
        (r, w, u, s)
        for r, w, u, s in itertools.product((1, 2, 4), (4, 8, 16), (1, 2), (1, 2, 4))
        if r * u <= 4
    ]
    mma = itertools.product((1, 2, 4), (4, 8, 16), (1,), (1, 2, 4))
    persistent = [
        cuda_gemv.CudaGemvConfig(r, w, u, 1, stage=True, persist=p, stage_scales=ss, half=h)
        for r, w, u, s in core
        if s == 1
        for p in (1, 2, 3, 4)
        for ss in STAGE_SCALES
        for h in HALF
    ]
    return (
        [cuda_gemv.CudaGemvConfig(*c, stage=st, stage_scales=ss, half=h) for st in (False, True) for c in core
         for ss in STAGE_SCALES for h in halves(st)]
        + persistent
        + [cuda_gemv.CudaGemvConfig(*c, mma=True) for c in mma]
        + staged_mma()
    )


# the decode step's fused launches (runtime.FUSE "auto" / "glu") per shape: Fusion kinds as tuned_config keys them
FUSED_KINDS = {
    "qkv": ["norm"],
    "o": ["+res"],
    "gate_up": ["norm+glu", "+glu"],
    "down": ["+res"],
    "lm_head": ["norm"],
}


def fused_launches(quick: bool) -> list[w4a16.WNA16Config]:
    mma = [
        w4a16.WNA16Config(1, 16 * r, 1, nw, kbi=1, mma=True, cuda=True) for r, nw in ((1, 4), (2, 4), (2, 8))
    ]
    if quick:
        return [
            w4a16.WNA16Config(1, 8 * r, 1, nw, kbi=u, cuda=True, stage=st, persist=p, stage_scales=ss, half=h)
            for r, nw, u in QUICK_CORE
            for st, p in QUICK_LAUNCHES
            for ss in STAGE_SCALES
            for h in halves(st)
        ] + mma
    launches = [(st, 0) for st in (False, True)] + [(True, p) for p in (1, 2, 3, 4)]
    return [
        w4a16.WNA16Config(1, 8 * r, 1, nw, kbi=u, cuda=True, stage=st, persist=p, stage_scales=ss, half=h)
        for r, nw, u, (st, p) in itertools.product((1, 2, 4), (4, 8, 16), (1, 2), launches)
        if r * u <= 4
        for ss in STAGE_SCALES
        for h in halves(st)
    ] + mma


def fused_rows(name: str, x: torch.Tensor, packed, flush_ms: float, quick: bool) -> tuple[list[dict], dict]:
    """Each fused kind of this shape on the CUDA-core kernel (staged or not; split 1): the best launch, checked
    against the separate operations; returns rows and tuned-config reprs keyed as tuned_config keys them."""
    n, k = packed.out_features, packed.in_features
    rows, tuned = [], {}
    for kind in FUSED_KINDS.get(name, []):  # the kernel-table shapes have no decode-step fusion
        glu = "glu" in kind
        norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16) if "norm" in kind else None
        res = (
            torch.randn(1, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
            if "res" in kind
            else None
        )
        fusion = w4a16.Fusion(norm=norm, eps=1e-5, residual=res, glu=glu)
        expected = fusion.unfused(x, packed).float()
        timed = []
        for cfg in fused_launches(quick):
            if not w4a16.fusable(cfg, packed, 1, fusion, x):
                continue
            err = rel_err(w4a16.wna16_matmul(x, packed, cfg, fusion), expected)
            us = (
                w4a16.device_time(lambda cfg=cfg, f=fusion: w4a16.wna16_matmul(x, packed, cfg, f)) - flush_ms
            ) * 1e3
            timed.append((us, err, cfg))
        timed.sort(key=lambda t: t[0])
        best = next(t for t in timed if t[1] < 1e-2)
        print(
            f"  fused {name} {kind}: {best[0]:.2f} us (err {best[1]:.1e}) {best[2]}; wrong {sum(t[1] >= 1e-2 for t in timed)}"
        )
        rows.append({"kind": kind, "us": best[0], "rel_err": best[1], "config": repr(best[2]),
                     "top": [[t[0], t[1], repr(t[2])] for t in timed[:4]]})  # fmt: skip
        tuned[str((1, n, k, 4, 128, True, kind))] = repr(best[2])
    return rows, tuned


def reference(x: torch.Tensor, packed) -> torch.Tensor:
    return x.float() @ dequantize_packed(packed, torch.float32).t()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def read_floor(packed, flush_ms: float) -> float:
    n, k = packed.out_features, packed.in_features
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    best = float("inf")
    for warps, unroll in ((8, 4), (4, 8), (8, 2), (16, 2)):
        kernel = torch.cuda._compile_kernel(f"#define NWARPS {warps}\n#define UNROLL {unroll}\n" + READ_ONLY,
                                            "lowbit_read_codes")  # fmt: skip

        def run(kernel=kernel, warps=warps) -> None:
            kernel(grid=(-(-n // 8), 1, 1), block=(32 * warps, 1, 1), args=[packed.qweight, sink, n, k])

        best = min(best, w4a16.device_time(run) - flush_ms)
    return best * 1e3


def check_schemes() -> list[dict]:
    """Asymmetric, per-channel and 256-feature groups, with split-K, both kernels, 1 and 11 tokens: relative error
    against float32."""
    rows = []
    n, k = 1000, 2048
    for group, asym, split, m in itertools.product((128, 256, -1), (False, True), (1, 3), (1, 11)):
        groups = 1 if group == -1 else k // group
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        scale = (torch.rand(n, groups, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
        zero = torch.randint(0, 16, (n, groups), device="cuda", dtype=torch.int16) if asym else None
        packed = pack_wna16(q, scale, zero, 4, group)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for mma, stage, staged_scales, half in ((False, False, 0, False), (False, True, 1, False),
                                                (False, True, 1, True), (False, False, 2, False), (True, False, 0, False),
                                                (True, True, 0, False)):  # fmt: skip
            if m > 1 and not mma:
                continue
            cfg = cuda_gemv.CudaGemvConfig(2, 4, 2, split, mma, stage, stage_scales=staged_scales, half=half)
            err = rel_err(cuda_gemv.gemv(x, packed, cfg), reference(x, packed))
            rows.append({"group": group, "asymmetric": asym, "split": split, "m": m, "mma": mma, "stage": stage,
                         "stage_scales": staged_scales, "half": half, "rel_err": err})  # fmt: skip
            print(f"check group={group:4d} asymmetric={asym!s:5} split={split} M={m:2d} mma={mma!s:5} "
                  f"stage={stage!s:5} stage_scales={staged_scales!s:5} half={half!s:5}: rel err {err:.2e}")  # fmt: skip
    return rows


def triton_best(x: torch.Tensor, packed) -> w4a16.WNA16Config:
    """The seeded Triton launch for this shape, else the tuner's best over the Triton candidates alone."""
    m, n, k = x.shape[0], packed.out_features, packed.in_features
    key = (m, n, k, 4, 128, True)
    if key in w4a16._TUNED and not w4a16._TUNED[key].cuda:
        return w4a16._TUNED[key]
    real = w4a16._cuda_candidates
    w4a16._cuda_candidates = lambda m: []
    try:
        w4a16._TUNED.pop(key, None)
        return w4a16.tuned_config(x, packed)
    finally:
        w4a16._cuda_candidates = real
        w4a16._TUNED.pop(key, None)


def int4pack_time(x: torch.Tensor, n: int, k: int, flush_ms: float) -> float | None:
    """``torch._weight_int4pack_mm`` (g128) at this shape, microseconds (None where this PyTorch lacks it)."""
    try:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        tiny = int4pack_baseline(q, torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001, 128)
        tiny(x)
        return (w4a16.device_time(lambda: tiny(x)) - flush_ms) * 1e3
    except Exception as exc:  # noqa: BLE001  (a PyTorch build without the op)
        print(f"  int4pack: {exc!r:.100}")
        return None


def shape_row(
    name: str,
    k: int,
    n: int,
    m: int,
    flush_ms: float,
    top: int,
    fused: bool,
    quick: bool = False,
    no_triton: bool = False,
) -> tuple[dict, dict]:
    """One shape's timings at M tokens; also the faster launch (Triton or best CUDA) as tuned-config reprs by key
    (with ``fused``, at one token, also the fused kinds')."""
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    del q
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = reference(x, packed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    cublas_us = (w4a16.device_time(lambda: F.linear(x, w)) - flush_ms) * 1e3
    w = None  # frees the bf16 weight (the closure above keeps the name)
    if no_triton:  # the unstaged tensor-core kernel stands in as the reference launch
        triton_cfg = w4a16.WNA16Config(1, 32, 1, 4, kbi=1, mma=True, cuda=True)
    else:
        triton_cfg = triton_best(x, packed)
    triton_err = rel_err(w4a16.wna16_matmul(x, packed, triton_cfg), ref)
    triton_us = (w4a16.device_time(lambda: w4a16.wna16_matmul(x, packed, triton_cfg)) - flush_ms) * 1e3
    int4pack_us = int4pack_time(x, n, k, flush_ms)
    timed = []
    for cfg in quick_sweep(m, MMA_AT_ONE[0]) if quick else sweep():
        if cfg.split > 1 and (k // 128) // cfg.split < (
            cfg.unroll if cfg.mma and cfg.stage else cfg.warps // 2
        ):
            continue  # fewer K-blocks per block than half its warps (staged tensor cores: than a load batch)
        if not cuda_gemv.supported(x, packed, cfg.mma):
            continue
        try:
            err = rel_err(cuda_gemv.gemv(x, packed, cfg), ref)
            us = (w4a16.device_time(lambda cfg=cfg: cuda_gemv.gemv(x, packed, cfg)) - flush_ms) * 1e3
        except Exception as exc:  # a launch shape past the registers or the shared memory
            print(f"  {name} M={m} {cfg}: {exc!r:.100}")
            continue
        timed.append({"us": us, "rel_err": err, "config": cfg.__dict__})
    timed.sort(key=lambda t: t["us"])
    good = [t for t in timed if t["rel_err"] < 1e-2]
    best = good[0]
    best_mma = next(t for t in good if t["config"]["mma"])
    row = {"shape": name, "m": m, "k": k, "n": n, "cublas_bf16_us": cublas_us, "triton_us": triton_us,
           "triton_config": repr(triton_cfg), "triton_rel_err": triton_err, "cuda_us": best["us"],
           "cuda_rel_err": best["rel_err"], "cuda_config": best["config"], "wrong": len(timed) - len(good),
           "best_mma_us": best_mma["us"], "int4pack_us": int4pack_us, "top": timed[:top]}  # fmt: skip
    read_bytes = n * k // 2 + scale.numel() * 2 + 2 * m * k
    extra = ""
    if m == 1:
        best_core = next(t for t in good if not t["config"]["mma"])
        probe_cfg = cuda_gemv.CudaGemvConfig(**best_core["config"])
        # the best CUDA-core launch without, cumulatively: 1 its dot products, 2 the scale loads, 3 the activations,
        # 4 the reduction across warps and the stores (cuda_gemv.source's no_math levels)
        ablation = {
            level: (
                w4a16.device_time(lambda lv=level: cuda_gemv.gemv(x, packed, probe_cfg, no_math=lv))
                - flush_ms
            )
            * 1e3
            for level in (1, 2, 3, 4)
        }
        row.update(
            best_core_us=best_core["us"],
            core_no_math_us=ablation[1],
            core_ablation_us=ablation,
            read_only_us=read_floor(packed, flush_ms),
        )
        extra = (f"  read-only {row['read_only_us']:6.2f} us [core {best_core['us']:.2f}, without math "
                 f"{ablation[1]:.2f}, + scales {ablation[2]:.2f}, + activations {ablation[3]:.2f}, + reduction and "
                 f"stores {ablation[4]:.2f}; mma {best_mma['us']:.2f}]")  # fmt: skip
    ref = "mma ref" if no_triton else "Triton"  # --no-triton: the unstaged tensor-core launch stands in
    print(f"{name:8s} M={m:2d} K={k:6d} N={n:6d} cuBLAS {cublas_us:7.2f}  {ref} {triton_us:7.2f} ({cublas_us / triton_us:.2f}x)"
          f"  CUDA {best['us']:7.2f} ({cublas_us / best['us']:.2f}x, {read_bytes / best['us'] / 1e3:.0f} GB/s, err "
          f"{best['rel_err']:.1e})  CUDA/Triton {triton_us / best['us']:.2f}x  wrong {row['wrong']}{extra}"
          + (f"  int4pack {int4pack_us:.2f} ({int4pack_us / best['us']:.2f}x)" if int4pack_us else ""), flush=True)  # fmt: skip
    for t in timed[:top]:
        print(f"    {t['us']:7.2f} us  err {t['rel_err']:.1e}  {t['config']}")
    c = cuda_gemv.CudaGemvConfig(**best["config"])
    cuda_cfg = w4a16.WNA16Config(
        1,
        c.block_rows,
        c.split,
        c.warps,
        kbi=c.unroll,
        mma=c.mma,
        cuda=True,
        stage=c.stage,
        persist=c.persist,
        pipe=c.pipe,
        stage_scales=c.stage_scales,
        half=c.half,
    )
    tuned = {str((m, n, k, 4, 128, True)): repr(cuda_cfg if best["us"] < triton_us else triton_cfg)}
    if fused and m == 1:
        row["fused"], fused_tuned = fused_rows(name, x, packed, flush_ms, quick)
        tuned.update(fused_tuned)
    return row, tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--seed-triton", type=Path, help="tuned Triton launches (bench/notes/decode_tuned_*.json)"
    )
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help=f"of {[s[0] for s in SHAPES]}")
    parser.add_argument(
        "--no-triton",
        action="store_true",
        help="skip the Triton tuning (the unstaged tensor-core launch instead)",
    )
    parser.add_argument("--ms", type=int, nargs="*", default=[1], help="tokens (1 to 16)")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="only the launches of quick_sweep (and fused_launches)"
    )
    parser.add_argument(
        "--fused", action="store_true", help="also time the decode step's fused launches (M = 1)"
    )
    parser.add_argument(
        "--stage-scales", choices=["off", "on", "tiled", "all"], default="all",
        help="the CUDA-core launches with each tile's scales staged in shared memory (CudaGemvConfig.stage_scales)",
    )  # fmt: skip
    parser.add_argument(
        "--mma-at-one", action="store_true",
        help="with --quick: the tensor-core launches at one token, staged ones included, and three CUDA-core ones",
    )  # fmt: skip
    parser.add_argument(
        "--half", choices=["off", "on", "both"], default="both",
        help="the staged CUDA-core launches in bf16 (off), fp16 (on, CudaGemvConfig.half) or both arithmetics",
    )  # fmt: skip
    args = parser.parse_args()
    MMA_AT_ONE[0] = args.mma_at_one
    HALF[:] = {"off": [False], "on": [True], "both": [False, True]}[args.half]
    STAGE_SCALES[:] = {"off": [0], "on": [1], "tiled": [2], "all": [0, 1, 2]}[args.stage_scales]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.seed_triton:
        load_tuned(args.seed_triton)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    result["checks"] = [] if args.skip_checks else check_schemes()
    tuned = {}
    flush_ms = w4a16.device_time(lambda: None)
    for m in args.ms:
        for name, k, n in (s for s in SHAPES if s[0] in args.shapes):
            row, shape_tuned = shape_row(
                name, k, n, m, flush_ms, args.top, args.fused, args.quick, args.no_triton
            )
            tuned.update(shape_tuned)
            result["shapes"].append(row)
            (args.out / "cuda_gemv.json").write_text(json.dumps(result, indent=1))
            (args.out / "cuda_tuned.json").write_text(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
