"""Activation and KV-cache quantization on the real SmolLM2-135M: one command, resumable, one table.

    python bench/activations.py [--device cuda] [--out bench/results/activations] [--data DIR]

Protocol (the bench protocol v1): calibration 128 x 512 tokens from wiki.valid.tokens (seed 0); perplexity on
the first 64 windows of 512 tokens of wiki.test.joined.txt; fp32. Rows:
- weight + activation schemes, each without and with a Hadamard rotation (QuaRot-style, online Hadamard on
  down_proj), weights by GPTQ (act-order, MSE clipping) except fp8 (round-to-nearest e4m3 per channel) and the
  W8A8 RTN / SmoothQuant rows; activations per-token dynamic and symmetric; weights symmetric per-channel;
- KV-cache rows on the full-precision weights: int8/int4/int2 (KIVI axes, group 64) and fp8, each plain, with
  the residual window, with IntactKV and with both; perplexity measured exactly as a decoding cache would see it
  (lowbit.eval.kv.perplexity_with_kv_cache), with the KV memory saved at 4096 tokens.
Each cell is cached in ``OUT/cells.json``; the table goes to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from protocol import DATA, Cells, load_protocol

import lowbit
from lowbit.eval.perplexity import perplexity

W8 = {"weights.bits": 8, "weights.group_size": -1, "weights.symmetric": True}
W4 = {"weights.bits": 4, "weights.group_size": -1, "weights.symmetric": True}
A8 = {"activations.bits": 8}
A4 = {"activations.bits": 4, "activations.clip_ratio": 0.9}
FP8 = {"method": "rtn", "weights.bits": 8, "weights.format": "fp8", "weights.group_size": -1,
       "activations.bits": 8, "activations.format": "fp8"}
SMOOTH = {"smoothquant.alpha": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
ROTATE = {"rotation.seed": 0}

SCHEMES: dict[str, dict] = {
    "W8A8 RTN": {"method": "rtn", **W8, **A8},
    "W8A8 RTN + SmoothQuant": {"method": "rtn", **W8, **A8, **SMOOTH},
    "W8A8 GPTQ": {**W8, **A8},
    "W8A8 GPTQ + SmoothQuant": {**W8, **A8, **SMOOTH},
    "W8A8 GPTQ + rotation": {**W8, **A8, **ROTATE},
    "FP8 W8A8": FP8,
    "FP8 W8A8 + rotation": {**FP8, **ROTATE},
    "FP8 W8A8 + rotation (no online Hadamard)": {**FP8, **ROTATE, "rotation.online_down_proj": False},
    "W4A8 GPTQ": {**W4, **A8},
    "W4A8 GPTQ + rotation": {**W4, **A8, **ROTATE},
    "W4A4 GPTQ": {**W4, **A4},
    "W4A4 GPTQ + SmoothQuant": {**W4, **A4, **SMOOTH},
    "W4A4 GPTQ + rotation": {**W4, **A4, **ROTATE},
    "W4A4 GPTQ + rotation, asymmetric A4": {**W4, **A4, **ROTATE, "activations.symmetric": False},
    "W4A4 GPTQ g64 + rotation": {**W4, **A4, **ROTATE, "weights.group_size": 64},
}


def kv_settings(residual: int, intact: int) -> dict[str, dict]:
    settings = {}
    for label, base in (("KV8", {"bits": 8}), ("KV4", {"bits": 4}), ("KV2", {"bits": 2}), ("KV fp8", {"bits": 8, "format": "fp8"})):
        settings[label] = base
        settings[f"{label} + residual {residual}"] = {**base, "residual": residual}
        settings[f"{label} + IntactKV {intact}"] = {**base, "intact_tokens": intact}
        settings[f"{label} + residual {residual} + IntactKV {intact}"] = {**base, "residual": residual, "intact_tokens": intact}
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("bench/results/activations"))
    parser.add_argument("--data", type=Path, default=DATA, help="folder with wiki.valid.tokens and wiki.test.joined.txt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--kv-residual", type=int, default=64, help="KIVI residual window, tokens")
    parser.add_argument("--kv-intact", type=int, default=1, help="IntactKV: first tokens kept exact")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    args = parser.parse_args()
    cells = Cells(args.out)
    record = cells.record
    protocol = load_protocol(args.model, args.data, args.device, args.num_samples, args.seqlen, args.max_windows)
    original, tokenizer, calibration, windows = protocol.model, protocol.tokenizer, protocol.calibration, protocol.windows
    only = {name.strip() for name in args.only.split(",") if name.strip()}

    if "FP" not in cells:
        record("FP", {"ppl": perplexity(original, windows).perplexity})
    for name, changes in SCHEMES.items():
        if name in cells or (only and name not in only):
            continue
        recipe = lowbit.Recipe().updated(**changes)
        started = time.perf_counter()
        quantized = lowbit.quantize(copy.deepcopy(original), recipe, calibration, tokenizer=tokenizer,
                                    device=args.device, progress=False)
        seconds = time.perf_counter() - started
        record(name, {"ppl": perplexity(quantized.model, windows).perplexity, "seconds": seconds,
                      "recipe": recipe.model_dump(mode="json", exclude_none=True)})
        del quantized

    from lowbit.eval.kv import perplexity_with_kv_cache
    from lowbit.kvcache import KVCacheScheme, kv_memory_report

    for name, fields in kv_settings(args.kv_residual, args.kv_intact).items():
        if name in cells or (only and name not in only):
            continue
        scheme = KVCacheScheme(**fields)
        started = time.perf_counter()
        ppl = perplexity_with_kv_cache(original, windows, scheme).perplexity
        memory = kv_memory_report(original.config, scheme, tokens=4096)
        record(name, {"ppl": ppl, "seconds": time.perf_counter() - started, "kv_bytes_fp16_4096": memory.fp16_bytes,
                      "kv_bytes_4096": memory.quantized_bytes, "kv_compression": memory.ratio})

    write_table(cells, args.out / "table.md", args.kv_residual, args.kv_intact)


def write_table(cells: dict, path: Path, residual: int, intact: int) -> None:
    fp = cells["FP"]["ppl"]
    lines = [f"FP perplexity {fp:.2f}", "", "| scheme | perplexity | vs FP | seconds |", "|---|---|---|---|"]
    for name in SCHEMES:
        if name in cells:
            cell = cells[name]
            lines.append(f"| {name} | {cell['ppl']:.2f} | {100 * (cell['ppl'] / fp - 1):+.1f}% | {cell['seconds']:.0f} |")
    lines += ["", "| KV cache (FP weights) | perplexity | vs FP | KV bytes at 4096 tokens | compression vs fp16 |",
              "|---|---|---|---|---|"]
    for name in kv_settings(residual, intact):
        if name in cells:
            cell = cells[name]
            lines.append(f"| {name} | {cell['ppl']:.2f} | {100 * (cell['ppl'] / fp - 1):+.1f}% | "
                         f"{cell['kv_bytes_4096']:,} | {cell['kv_compression']:.2f}x |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
