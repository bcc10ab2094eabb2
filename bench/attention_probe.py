"""Where the fused decode attention's time goes (issue 6): a sweep of ``decode_attention_rope``'s launches at the
Llama-3-8B decode shape, with the launch's fixed costs taken apart.

Run on one GPU:  ``python bench/attention_probe.py --out DIR``

One token per step, 32 query heads over 8 key/value heads of 128, a static cache of ``--cache`` positions, the
step at position ``--positions``. Times are device times from CUDA-graph replays
(:func:`lowbit.kernels.w4a16.device_time`) minus the same graph with the L2 flush alone: what the launch costs in
the decode step's graph, where the layer's cache has left the L2 since the last step. Rows:

* ``floor``: a Triton kernel on the same grid that loads a position and stores one value: the launch alone;
* ``new rows only``: the default launch at position 0 (an empty cache: rotary, cache writes, the new rows, the
  merge) and the same with one slice (no merge);
* the sweep: slices x positions per step x warps x where the new rows go (slice 0 or a program of their own), each
  checked against one slice.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import triton
import triton.language as tl

from lowbit.kernels import cuda_attention, w4a16
from lowbit.kernels.attention import decode_attention_rope, default_split

B, H, KV, D = 1, 32, 8, 128


@triton.jit
def _launch_floor(pos_ptr, out_ptr):
    value = tl.load(pos_ptr)
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), value)


def inputs(cache: int, position: int) -> dict:
    qkv = torch.randn(B, 1, (H + 2 * KV) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    angles = torch.randn(cache, D // 2, device="cuda")
    angles = torch.cat((angles, angles), dim=-1)
    return {
        "q": q.view(B, 1, H, D).transpose(1, 2),
        "k": k.view(B, 1, KV, D).transpose(1, 2),
        "v": v.view(B, 1, KV, D).transpose(1, 2),
        "cos": angles.cos().to(torch.bfloat16),
        "sin": angles.sin().to(torch.bfloat16),
        "k_cache": torch.randn(B, KV, cache, D, device="cuda", dtype=torch.bfloat16),
        "v_cache": torch.randn(B, KV, cache, D, device="cuda", dtype=torch.bfloat16),
        "pos": torch.tensor([position], device="cuda"),
    }


def run(x: dict, cuda_split: int | None = None, **launch):
    if cuda_split is not None:  # lowbit.kernels.cuda_attention
        return cuda_attention.decode_attention_rope(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["k_cache"],
                                                    x["v_cache"], x["pos"], split=cuda_split)  # fmt: skip
    return decode_attention_rope(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["k_cache"], x["v_cache"], x["pos"],
                                 **launch)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--cache", type=int, default=640)
    parser.add_argument("--positions", type=int, nargs="*", default=[576, 639])
    parser.add_argument("--splits", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--block-ls", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--warps", type=int, nargs="*", default=[2, 4])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = w4a16.device_time(lambda: None)

    def timed(fn) -> float:
        return (w4a16.device_time(fn) - base) * 1e3

    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cache": args.cache}
    split0 = default_split(B * KV, args.cache, 32, torch.device("cuda"))
    pos = torch.tensor([0], device="cuda")
    sink = torch.empty(B * KV * split0, device="cuda", dtype=torch.int64)
    result["floor_us"] = timed(lambda: _launch_floor[(B * KV, split0)](pos, sink, num_warps=2))
    print(f"floor (an empty launch on the {B * KV} x {split0} grid): {result['floor_us']:.2f} us")
    x0 = inputs(args.cache, 0)
    result["new_rows_only_us"] = {
        "default": timed(partial(run, x0)),
        "one slice": timed(partial(run, x0, split=1)),
        "own program": timed(partial(run, x0, new_slice=True)),
        "cuda split 8": timed(partial(run, x0, cuda_split=8)),
        "cuda split 1": timed(partial(run, x0, cuda_split=1)),
    }
    print(
        "position 0 (new rows only): "
        + ", ".join(f"{k} {v:.2f} us" for k, v in result["new_rows_only_us"].items())
    )

    result["sweep"] = []
    for position in args.positions:
        x = inputs(args.cache, position)
        expected = run(x, split=1).float()
        rows = []
        for split in args.splits:
            for block_l in args.block_ls:
                for warps in args.warps:
                    for new_slice in (False, True):
                        launch = {
                            "split": split,
                            "block_l": block_l,
                            "num_warps": warps,
                            "new_slice": new_slice,
                        }
                        try:
                            err = (run(x, **launch).float() - expected).abs().max().item()
                            us = timed(partial(run, x, **launch))
                        except Exception as exc:  # out of registers or shared memory for this launch
                            print(f"  {launch}: {exc!r:.80}")
                            continue
                        rows.append({"us": us, "max_err": err, **launch})
        for cuda_split in (1, 2, 4, 8):
            err = (run(x, cuda_split=cuda_split).float() - expected).abs().max().item()
            rows.append({"us": timed(partial(run, x, cuda_split=cuda_split)), "max_err": err, "split": cuda_split,
                         "block_l": 0, "num_warps": 4, "new_slice": True, "kernel": "cuda"})  # fmt: skip
        rows.sort(key=lambda r: r["us"])
        default = next(r for r in rows if (r["split"], r["block_l"], r["num_warps"], r["new_slice"]) ==
                       (split0, 32, 2, False))  # fmt: skip
        print(f"position {position} of {args.cache}: default (split {split0}, 32, 2 warps, new rows in slice 0) "
              f"{default['us']:.2f} us; best of {len(rows)}:")  # fmt: skip
        for r in rows[:10]:
            print(f"    {r['us']:6.2f} us  {r.get('kernel', 'triton')} split={r['split']:2d} block_l={r['block_l']:3d} "
                  f"warps={r['num_warps']} new_slice={int(r['new_slice'])}  max err {r['max_err']:.1e}")  # fmt: skip
        for r in rows:
            if r.get("kernel") == "cuda":
                print(f"    cuda split {r['split']}: {r['us']:.2f} us, max err {r['max_err']:.1e}")
        best_own = min((r for r in rows if r["new_slice"] and "kernel" not in r), key=lambda r: r["us"])
        best_zero = min((r for r in rows if not r["new_slice"]), key=lambda r: r["us"])
        print(f"    best with the new rows in slice 0 {best_zero['us']:.2f} us, in their own program "
              f"{best_own['us']:.2f} us")  # fmt: skip
        result["sweep"].append({"position": position, "default": default, "rows": rows})
    (args.out / "attention_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
