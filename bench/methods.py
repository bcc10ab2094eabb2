"""Issue 7 on the real SmolLM2-135M: lowbit's best W3/W2 recipes and one ablation row per method, one command.

    python bench/methods.py [--device cuda] [--out bench/results/methods] [--data DIR] [--only ROW,ROW]

Protocol v1 (calibration 128 x 512 tokens of wiki.valid.tokens, seed 0; perplexity on the first 64 windows of
512 tokens of wiki.test.joined.txt; fp32). Rows per setting (W3 / W2 asymmetric g64, W4 symmetric g64): GPTQ
with lowbit's defaults; + AWQ; + two-stage grids; + LeanQuant grids; + block-wise reconstruction; and the
committed best recipe (bench/recipes/smollm2-best-w*.yaml). The best recipes' checkpoints are saved, reloaded
with plain transformers + compressed-tensors (``CompressedTensorsConfig(dequantize=True)``, llm-compressor#1618)
and evaluated again, so the reported figure is the checkpoint's. Cells are cached in ``OUT/cells.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from protocol import DATA, Cells, load_protocol

import lowbit
from lowbit.eval.perplexity import perplexity

RECIPES = Path(__file__).resolve().parent / "recipes"
SETTINGS = {
    "W3 asym g64": ({"weights.bits": 3, "weights.symmetric": False, "weights.group_size": 64}, "smollm2-best-w3.yaml"),
    "W2 asym g64": ({"weights.bits": 2, "weights.symmetric": False, "weights.group_size": 64}, "smollm2-best-w2.yaml"),
    "W4 sym g64": ({"weights.bits": 4, "weights.symmetric": True, "weights.group_size": 64}, "smollm2-best-w3.yaml"),
}
ABLATIONS = {
    "GPTQ": {},
    "GPTQ + AWQ": {"awq.grid": 20},
    "GPTQ + two-stage": {"gptq.grid": "two_stage"},
    "GPTQ + LeanQuant": {"gptq.grid": "leanquant"},
    "GPTQ + block-wise": {"blockwise.iterations": 200},
    "GPTQ + AWQ + block-wise": {"awq.grid": 20, "blockwise.iterations": 200},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("bench/results/methods"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated 'SETTING | ROW' keys to run (default: all)")
    args = parser.parse_args()
    cells = Cells(args.out)
    record = cells.record
    only = {key.strip() for key in args.only.split(",") if key.strip()}
    protocol = load_protocol(args.model, args.data, args.device, max_windows=args.max_windows)
    original, tokenizer, source = protocol.model, protocol.tokenizer, protocol.source
    calibration, windows = protocol.calibration, protocol.windows
    if "FP" not in cells:
        record("FP", {"ppl": perplexity(original, windows).perplexity})
    for setting, (scheme, best_file) in SETTINGS.items():
        rows = {name: lowbit.Recipe().updated(**scheme, **changes) for name, changes in ABLATIONS.items()}
        rows["best recipe"] = lowbit.Recipe.from_yaml(RECIPES / best_file).updated(**scheme)
        for name, recipe in rows.items():
            key = f"{setting} | {name}"
            if key in cells or (only and key not in only):
                continue
            started = time.perf_counter()
            quantized = lowbit.quantize(copy.deepcopy(original), recipe, calibration, tokenizer=tokenizer,
                                        device=args.device, progress=False)
            seconds = time.perf_counter() - started
            result = {"ppl": perplexity(quantized.model, windows).perplexity, "seconds": seconds,
                      "transforms": [t.get("kind") for t in quantized.report.transforms]}
            if name == "best recipe":
                quantized.source = source
                result["checkpoint_ppl"] = checkpoint_perplexity(quantized, windows, args.out / "checkpoint")
            record(key, result)
            del quantized
    write_table(cells, args.out / "table.md")


def checkpoint_perplexity(quantized: lowbit.QuantizedModel, windows: torch.Tensor, folder: Path) -> float:
    """Save, reload with plain transformers + compressed-tensors, and measure the reloaded model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = lowbit.save(quantized, folder, overwrite=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    loaded.to(next(quantized.model.parameters()).device)
    return perplexity(loaded, windows).perplexity


def write_table(cells: dict, path: Path) -> None:
    lines = [f"FP perplexity {cells['FP']['ppl']:.2f}", "", "| setting | row | perplexity | checkpoint reloaded | seconds |",
             "|---|---|---|---|---|"]
    for key, cell in cells.items():
        if key == "FP":
            continue
        setting, row = key.split(" | ")
        reloaded = f"{cell['checkpoint_ppl']:.2f}" if "checkpoint_ppl" in cell else ""
        lines.append(f"| {setting} | {row} | {cell['ppl']:.2f} | {reloaded} | {cell['seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
