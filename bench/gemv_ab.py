"""A/B of the CUDA C GEMVs' source (:data:`lowbit.kernels.cuda_gemv.SOURCE`) against another copy of the module (issue
6): every launch built from both, their outputs compared bit for bit, and both timed alternately; with ``--half``,
each staged launch also in fp16 arithmetic (``CudaGemvConfig.half``, this source), its error against float32 beside
the bf16 launches'.

Run on one GPU:  ``python bench/gemv_ab.py --old PATH/cuda_gemv.py --out DIR [--half]``

Times are CUDA-graph replays with a writing 128 MB flush before each call, minus the flush alone (bench/m1_probe.py),
the better of two rounds per side. Writes ``gemv_ab.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
from cuda_gemv import SHAPES, reference
from m1_probe import graph_time

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.cuda_gemv import Fused
from lowbit.kernels.layout import pack_wna16

C = cuda_gemv.CudaGemvConfig
# the staged one-token launches (the tuner's picks on down, q/k/v and gate_up in sessions 22-24, and neighbours),
# plain and with a decode step's fused work
LAUNCHES = [C(2, 16, 1, 1, stage=True, persist=4), C(2, 16, 1, 1, stage=True, persist=2), C(2, 8, 1, 1, stage=True),
            C(2, 4, 2, 1, stage=True), C(4, 4, 1, 1, stage=True, stage_scales=2)]  # fmt: skip
# unstaged launches (the tuner's picks on 4096x14336 and 8192x28672 in sessions 22-24), plain only: no fp16 twin
UNSTAGED = [C(2, 4, 2, 1), C(2, 8, 1, 1), C(4, 4, 1, 1, stage_scales=2)]
SHAPE_NAMES = ["down", "qkv", "gate_up", "4096x14336"]


_CACHES: dict[str, dict] = {}


def build(source: str):
    """Run the next calls with ``source`` as the kernels' text, each source's kernels in a cache of their own (the
    shared-memory limits stay keyed by id(kernel): every kernel is kept alive in its cache, so no id is reused)."""
    cuda_gemv.SOURCE = source
    cuda_gemv._KERNELS = _CACHES.setdefault(source, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--half", action="store_true", help="also each staged launch in fp16 (this source)")
    parser.add_argument("--shapes", nargs="*", default=SHAPE_NAMES, choices=SHAPE_NAMES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("old_cuda_gemv", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # its dataclasses look their module up
    spec.loader.exec_module(old)
    sources = {"old": old.SOURCE, "new": cuda_gemv.SOURCE}
    torch.manual_seed(0)
    buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    rows = []
    for name in args.shapes:
        k, n = next((k, n) for s, k, n in SHAPES if s == name)
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
        packed = pack_wna16(q, scale, None, 4, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = reference(x, packed)
        norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        fusions = {"plain": None, "norm": Fused(norm=norm)}
        if name == "gate_up":
            fusions["norm+glu"] = Fused(norm=norm, glu=True)
        for cfg in LAUNCHES + UNSTAGED:
            for kind, fused in fusions.items():
                if (fused is not None and cfg in UNSTAGED) or (fused is not None and not cuda_gemv.fusable(cfg, x, packed, fused)):
                    continue
                # what each side runs: (its source, its launch)
                sides = {"old": (sources["old"], cfg), "new": (sources["new"], cfg)}
                if args.half and cfg.stage:
                    sides["half"] = (sources["new"], dataclasses.replace(cfg, half=True))
                if fused is None:
                    expected = ref
                else:
                    fusion = w4a16.Fusion(norm=fused.norm, eps=fused.eps, glu=fused.glu, residual=fused.residual)
                    expected = fusion.unfused(x, packed).float()
                outs, times = {}, {side: [] for side in sides}
                for _ in range(2):
                    for side, (source, launch) in sides.items():
                        build(source)
                        outs[side] = cuda_gemv.gemv(x, packed, launch, fused=fused)
                        times[side].append(
                            graph_time(
                                lambda x=x, p=packed, c=launch, f=fused: cuda_gemv.gemv(x, p, c, fused=f),
                                buf.zero_,
                            )
                        )
                build(sources["new"])
                same = bool(torch.equal(outs["old"], outs["new"]))
                errs = {side: ((out.float() - expected).norm() / expected.norm()).item() for side, out in outs.items()}
                row = {"shape": name, "config": cfg.__dict__, "fused": kind, "bitwise_same": same, "err": errs["new"],
                       "errs": errs, **{f"{side}_us": min(t) for side, t in times.items()}}  # fmt: skip
                rows.append(row)
                half = f"  half {row['half_us']:6.2f} us err {errs['half']:.1e}" if "half" in sides else ""
                print(f"{name:10s} {cfg.rows}x{cfg.warps}x{cfg.unroll} stage {cfg.stage:d} persist {cfg.persist} scales "
                      f"{cfg.stage_scales} {kind:8s}: old {row['old_us']:6.2f}  new {row['new_us']:6.2f} us"
                      f"  {'same bits' if same else 'DIFFERENT'}  err {errs['new']:.1e}{half}", flush=True)  # fmt: skip
                (args.out / "gemv_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
