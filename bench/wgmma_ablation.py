"""Where the ``wgmma`` W4A16 GEMM's time goes (issue 6): the kernel timed with parts of its K loop taken out.

Run on a Hopper GPU:  ``python bench/wgmma_ablation.py --out DIR [--ms 64 128]``

For each Llama-3 shape and token count, the launch that was fastest in session 17 (``bench/cuda_gemm.py --kernel
wgmma``) is built as it is and in variants whose source has parts of the loop edited out, so that their outputs are
wrong and only their times mean anything:

* ``no_dequant``: the A registers are the packed words as loaded (no ``raw_codes`` / ``fma`` / ``mul``);
* ``no_copy``: the loop issues no ``cp.async`` (the prologue's stages are computed over and over);
* ``no_wgmma``: no tensor-core products (each step's A registers are folded into one accumulator instead, so the
  dequantization is not optimized away);
* ``skeleton``: ``no_dequant`` and ``no_copy`` together: the products, barriers and waits alone;
* ``const_a`` (session 24): the skeleton with each step's A registers the K-block's packed words unchanged (no
  per-step register writes); ``fence_once``: ``const_a`` with one ``wgmma.fence`` per K-block instead of one per step
  (whether the per-step fence, which register-fed products need, is what spaces the 16-token products out).

The gap between ``full`` and each variant is what that part costs where it is not hidden. Times are CUDA-graph device
time (:func:`lowbit.kernels.w4a16.device_time`, L2 flushed) minus the flush, with cuBLAS bf16 in the same run.
Writes ``wgmma_ablation.json`` under ``--out``.

``--launches continuous``: session 19's continuous stream-K launches at 16 tokens instead of split-K.
``--chains 1 2 4``: each launch with that many accumulators per row tile (``CudaWgmmaConfig.chains``, session 24);
``--late``: with ``late_scale`` where it applies (at most 32 tokens). Each launch's full variant is checked against
float32 first (``rel_err`` in the rows).

``--profile SHAPE:M``: for Nsight Compute, run each of ``--variants`` at that point three times, untimed and outside
CUDA graphs (``ncu -k lowbit_w4a16_wgmma --launch-skip 1 --launch-count 1 python bench/wgmma_ablation.py
--profile 4096x14336:128 --variants full``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F

from lowbit.kernels import cuda_gemm, cuda_wgmma, w4a16
from lowbit.kernels.cuda_wgmma import CudaWgmmaConfig as C
from lowbit.kernels.dequant import dequantize_packed
from lowbit.kernels.layout import pack_wna16

# the fastest plain split-K launch per (shape, tokens) in session 18's call 1 (bench/notes/cuda_wgmma_h200_session18_call1.json;
# 64 and 128 tokens as in session 17's call 1 but for 4096x4096 at 128 tokens)
BEST = {
    ("4096x4096", 16): C(1, 2, 16, 5, split=4, depth=4),
    ("4096x14336", 16): C(1, 2, 16, 4, split=8, depth=4),
    ("14336x4096", 16): C(1, 2, 16, 4, split=8, depth=4),
    ("8192x28672", 16): C(2, 2, 16, 4, split=2, depth=4),
    ("4096x4096", 64): C(1, 2, 64, 5, split=4, depth=4),
    ("4096x4096", 128): C(1, 2, 64, 4, split=4, depth=4),
    ("4096x14336", 64): C(2, 2, 64, 4, split=2, depth=4),
    ("4096x14336", 128): C(2, 2, 128, 4, split=2, depth=4),
    ("14336x4096", 64): C(1, 2, 64, 5, split=4, depth=4),
    ("14336x4096", 128): C(1, 2, 128, 5, split=4, depth=4),
    ("8192x28672", 64): C(2, 2, 64, 4, split=1, depth=4),
    ("8192x28672", 128): C(2, 2, 128, 4, split=1, depth=4),
}
# --launches continuous: the continuous stream-K launches session 19's sweep found fastest at 16 tokens
# (bench/notes/cuda_wgmma_h200_session19_call2.json), two 128-row workers per SM
CONTINUOUS = {
    ("4096x14336", 16): C(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2),
    ("8192x28672", 16): C(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2),
    ("14336x4096", 16): C(1, 2, 16, 4, depth=4, stream=True, continuous=True, per_sm=2),
}
SHAPES = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336), "14336x4096": (14336, 4096),
          "8192x28672": (8192, 28672)}  # fmt: skip

DEQUANT = re.compile(r"dequant_pair\(raw_codes\((packs\[r\]\[\d\]\[[^\]]+\]), j & 3\), [^;]+\);")
LOOP_COPY = "            load_stage(g0 + i + AHEAD);\n"
PRODUCT = ("wgmma_tile(acc[j % CHAINS][r], a[b][r][0], a[b][r][1], a[b][r][2], a[b][r][3], desc + (x_step(j) >> 4),\n"
           "                               true);")


FENCE = "                wgmma_fence();\n"


def variant(source: str, name: str) -> str:
    """``source`` with the parts ``name`` leaves out edited away (each edit must find its text: a changed kernel
    fails here rather than timing the wrong thing)."""
    if name in ("no_dequant", "skeleton"):
        source, count = DEQUANT.subn(r"\1 ^ (u32)j;", source)
        assert count == 4, count
    if name in ("const_a", "fence_once"):
        source, count = DEQUANT.subn(r"\1;", source)
        assert count == 4, count
    if name == "fence_once":
        assert source.count(FENCE) == 1
        source = source.replace(FENCE, "                if (j == 0) wgmma_fence();\n")
    if name in ("no_copy", "skeleton", "const_a", "fence_once"):
        assert source.count(LOOP_COPY) == 1
        source = source.replace(LOOP_COPY, "            cp_async_commit();\n")
    if name == "no_wgmma":
        assert source.count(PRODUCT) == 1
        source = source.replace(
            PRODUCT, "acc[j % CHAINS][r][j] += __uint_as_float(a[b][r][0] ^ a[b][r][1] ^ a[b][r][2] ^ a[b][r][3]);"
        )
    return source


VARIANTS = ("full", "no_dequant", "no_copy", "no_wgmma", "skeleton", "const_a", "fence_once")
_CACHE: dict = {}


def launcher(cfg: C, name: str, x: torch.Tensor, packed):
    """A function that runs variant ``name`` of launch ``cfg`` (symmetric g128 codes) once."""
    index = torch.cuda.current_device()
    shared = cuda_wgmma.shared_bytes(cfg)
    kernel = cuda_gemm.compile_with_shared(_CACHE, (cfg, name), index, lambda: variant(cuda_wgmma.source(cfg, 1, False, False), name),
                                           cfg.kernel_name, f"{name} {cfg}", shared, arch="90a")  # fmt: skip
    if not cfg.stream:
        return lambda: cuda_gemm.launch(kernel, cfg, x, packed, index, shared)
    n, k = packed.out_features, packed.in_features
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    workers = cuda_wgmma.stream_workers(cfg, x.shape[0], n, k, sms)
    return lambda: cuda_gemm.launch(kernel, cfg, x, packed, index, shared, workers, cuda_wgmma.STREAM_SLOTS)


def timed(cfg: C, name: str, x: torch.Tensor, packed, flush_ms: float) -> float:
    run = launcher(cfg, name, x, packed)
    run()
    return 1e3 * (w4a16.device_time(run) - flush_ms)


def weights(shape: str, m: int):
    k, n = SHAPES[shape]
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    return pack_wna16(q, scale, None, 4, 128), torch.randn(m, k, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ms", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--profile", help="SHAPE:M, e.g. 4096x14336:128: run untimed, for ncu")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--launches", choices=["split", "continuous"], default="split",
                        help="the fastest plain split-K launches, or session 19's continuous stream-K ones")  # fmt: skip
    parser.add_argument("--chains", type=int, nargs="*", default=[1],
                        help="each launch with these CudaWgmmaConfig.chains (accumulators per row tile; at most depth)")
    parser.add_argument("--late", action="store_true", help="the launches with late_scale (at most 32 tokens)")
    args = parser.parse_args()
    launches = BEST if args.launches == "split" else CONTINUOUS
    launches = {(shape, m): dataclasses.replace(cfg, late_scale=args.late and m <= 32) for (shape, m), cfg in launches.items()}
    if args.profile:
        shape, m = args.profile.split(":")
        packed, x = weights(shape, int(m))
        for name in args.variants:
            run = launcher(launches[shape, int(m)], name, x, packed)
            for _ in range(3):
                run()
        torch.cuda.synchronize()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    flush_ms = w4a16.device_time(lambda: None)
    rows = []
    for (shape, m), base in launches.items():
        if m not in args.ms:
            continue
        k, n = SHAPES[shape]
        packed, x = weights(shape, m)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        cublas = 1e3 * (w4a16.device_time(lambda x=x, dense=dense: F.linear(x, dense)) - flush_ms)
        for chains in args.chains:
            try:
                cfg = dataclasses.replace(base, chains=chains)
            except ValueError as exc:
                print(f"{shape} M={m} chains={chains}: {exc}")
                continue
            row_of(rows, shape, m, cfg, cublas, x, packed, flush_ms, args.variants)
            (args.out / "wgmma_ablation.json").write_text(json.dumps(rows, indent=1))
        del dense, packed
        torch.cuda.empty_cache()


def row_of(rows: list, shape: str, m: int, cfg: C, cublas: float, x, packed, flush_ms: float, variants) -> None:
    """Times every variant of launch ``cfg``, checks the full one against float32 first, and appends its row."""
    k, n = SHAPES[shape]
    ref = x.float() @ dequantize_packed(packed, torch.float32).T
    out = launcher(cfg, "full", x, packed)()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    times = {name: timed(cfg, name, x, packed, flush_ms) for name in variants}
    tflops = {name: 2 * m * n * k / us / 1e6 for name, us in times.items()}
    rows.append({"shape": shape, "m": m, "config": str(cfg), "cublas_us": cublas, "us": times, "tflops": tflops,
                 "rel_err": err})  # fmt: skip
    print(f"{shape:11s} M={m:3d} cuBLAS {cublas:7.2f} us | " + " | ".join(
        f"{name} {us:7.2f} us ({tflops[name]:4.0f} TF/s)" for name, us in times.items())
        + f" | err {err:.1e} chains {cfg.chains} late {cfg.late_scale}  {cfg}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
