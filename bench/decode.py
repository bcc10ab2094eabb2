"""Decode benchmark for issue 6: a Llama-3-8B-shaped random-weight model, bf16 against lowbit schemes.

Run on one GPU (one device call):  ``python bench/decode.py --out bench/results``

For each scheme and batch size (1 and 16): a 512-token random prompt, then 128 greedy tokens with
the static KV cache and the CUDA-graph decode step of :mod:`lowbit.kernels.runtime` (compiled with
``torch.compile`` for every scheme alike unless ``--no-compile``); decode
tokens/s counts the replayed steps only. The lm_head stays bf16 in every scheme; ``--lm-head-quantized`` adds
a row per quantized scheme with the lm_head in that scheme too (``w4a16+lm_head``). Writes
``decode.json`` and ``decode.md`` under ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import traceback
from pathlib import Path

import kernel_import  # noqa: E402,F401  (puts src/lowbit on the path, kernels only)
import torch

from lowbit.kernels import attention, pdl, persistent, prefetch, runtime, w4a16  # noqa: E402
from lowbit.kernels.runtime import bench_decode  # noqa: E402

SCHEMES = ["bf16", "w4a16", "w8a16", "int8", "fp8"]


def markdown(rows: list[dict]) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["scheme"] == "bf16"}
    lines = [
        "| scheme | batch | prefill ms (512 tok/seq) | decode tokens/s | vs bf16 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        lines.append(
            f"| {r['scheme']} | {r['batch']} | {r['prefill_s'] * 1e3:.0f} | {r['tokens_per_s']:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--schemes", nargs="*", default=SCHEMES)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="eager decode step (no torch.compile)")
    parser.add_argument("--lm-head-quantized", action="store_true",
                        help="also run each quantized scheme with its lm_head quantized the same way")  # fmt: skip
    parser.add_argument("--attention", choices=["auto", "matmul", "reduce", "sdpa", "triton"], default="auto",
                        help="the decode step's attention (lowbit.kernels.runtime.ATTENTION)")  # fmt: skip
    parser.add_argument("--fuse", choices=["off", "auto", "glu", "auto+head"], default=runtime.FUSE[0],
                        help="norms, SwiGLU and residual adds inside the 4-bit GEMVs (lowbit.kernels.runtime.FUSE; "
                        "+head: the final norm inside the lm_head's too, FUSE_LM_HEAD)")  # fmt: skip
    parser.add_argument("--persistent", choices=["off", "auto"], default=persistent.PERSISTENT[0],
                        help="o, norm, gate/up, SwiGLU and down as one launch at batch 1 "
                        "(lowbit.kernels.persistent.PERSISTENT)")  # fmt: skip
    parser.add_argument("--pdl", choices=["off", "early", "late", "attention"], default="off",
                        help="programmatic dependent launch of lowbit's kernels (lowbit.kernels.pdl.PDL)")  # fmt: skip
    parser.add_argument("--prefetch-blocks", type=int, default=pdl.PREFETCH_BLOCKS[0],
                        help="K-blocks each W4A16 program prefetches into L2 before its PDL wait")
    parser.add_argument("--l2-next-mb", type=float, default=prefetch.NEXT_MB[0],
                        help="MB of the next projection's weights each lowbit kernel prefetches into the L2 "
                        "(lowbit.kernels.prefetch.NEXT_MB; 0: off)")  # fmt: skip
    parser.add_argument("--l2-attention-mb", type=float, default=prefetch.ATTENTION_MB[0],
                        help="MB of the o and gate/up weights the decode attention prefetches into the L2 "
                        "(lowbit.kernels.prefetch.ATTENTION_MB; 0: off)")  # fmt: skip
    parser.add_argument("--attention-kernel", choices=["triton", "cuda"], default=attention.ROPE_LAUNCH["kernel"],
                        help="the fused decode attention's kernel (lowbit.kernels.attention.ROPE_LAUNCH)")
    parser.add_argument("--quantized-head-only", action="store_true",
                        help="the non-bf16 schemes only with their lm_head quantized")
    parser.add_argument("--tuned", type=Path, help="seed the W4A16 tuner with these launches "
                        "(decode_profile.load_tuned); shapes not in the file are tuned as usual")  # fmt: skip
    args = parser.parse_args()
    if args.tuned:
        from decode_profile import load_tuned

        print(f"seeded {load_tuned(args.tuned)} tuned shapes from {args.tuned}", flush=True)
    pdl.PREFETCH_BLOCKS[0] = args.prefetch_blocks
    prefetch.NEXT_MB[0], prefetch.ATTENTION_MB[0] = args.l2_next_mb, args.l2_attention_mb
    runtime.ATTENTION[0] = args.attention
    attention.ROPE_LAUNCH["kernel"] = args.attention_kernel
    runtime.FUSE[0], runtime.FUSE_LM_HEAD[0] = args.fuse.removesuffix("+head"), args.fuse.endswith("+head")
    persistent.PERSISTENT[0] = args.persistent
    pdl.PDL[0] = args.pdl
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows: list[dict] = []
    runs = [(s, False) for s in args.schemes if s == "bf16" or not args.quantized_head_only]
    if args.lm_head_quantized or args.quantized_head_only:
        runs += [(s, True) for s in args.schemes if s != "bf16"]
    for scheme, quantized_head in runs:
        try:
            new = bench_decode(scheme, tuple(args.batch_sizes), args.prompt_len, args.new_tokens,
                               compile_step=not args.no_compile, quantize_lm_head=quantized_head)
        except Exception:  # keep the other schemes; the log shows what failed
            traceback.print_exc()
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        for r in new:
            r["l2_next_mb"], r["l2_attention_mb"] = prefetch.NEXT_MB[0], prefetch.ATTENTION_MB[0]
            r["persistent"] = persistent.PERSISTENT[0]
            print(json.dumps(r), flush=True)
        rows += new
        if w4a16.TUNING_LOG:  # which launch each W{4,8}A16 shape got, and the runners-up (us per call, 128 MB flush included)
            tuning = {str(key): [(round(ms * 1e3, 1), str(cfg)) for ms, cfg in timings[:3]]
                      for key, timings in w4a16.TUNING_LOG.items()}  # fmt: skip
            (args.out / f"tuning_{scheme}.json").write_text(json.dumps(tuning, indent=1))
            for key, best in tuning.items():
                print(f"  tuned {key}: {best[0] if best else None}", flush=True)
            w4a16.TUNING_LOG.clear()
        (args.out / "decode.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "decode.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
