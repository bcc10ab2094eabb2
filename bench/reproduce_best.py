"""Issue 7's reproduction check: the committed best recipes, run through the CLI exactly as their headers say,
give checkpoints whose perplexity, measured after loading them with plain transformers + compressed-tensors,
is the one the bench reported.

    python bench/reproduce_best.py --model SMOLLM2.gguf --data DIR [--device cuda] [--out results.json] [W3 W2]

For each setting: ``lowbit quantize MODEL --recipe bench/recipes/smollm2-best-wN.yaml --calibration
DIR/wiki.valid.tokens --dtype float32 --out TMP`` in a subprocess (the user's command), then
``AutoModelForCausalLM.from_pretrained(TMP, quantization_config=CompressedTensorsConfig(dequantize=True))``
(llm-compressor#1618: transformers needs ``dequantize=True`` for asymmetric pack-quantized checkpoints) and
perplexity on protocol v1's windows (first 64 windows of 512 tokens of DIR/wiki.test.joined.txt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from protocol import DATA

from lowbit.data.calibration import tokenize_text
from lowbit.eval.perplexity import perplexity, token_windows

RECIPES = Path(__file__).resolve().parent / "recipes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=["W3", "W2"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    results = {}
    for setting in args.settings:
        recipe = RECIPES / f"smollm2-best-{setting.lower()}.yaml"
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "checkpoint"
            command = [sys.executable, "-m", "lowbit.cli", "quantize", args.model, "--recipe", str(recipe),
                       "--calibration", str(args.data / "wiki.valid.tokens"), "--dtype", "float32",
                       "--device", args.device, "--out", str(folder)]
            started = time.perf_counter()
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - started
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
            model.to(args.device)
            text = (args.data / "wiki.test.joined.txt").read_text()
            windows = token_windows(tokenize_text(tokenizer, text), 512, 64)
            results[setting] = {"command": " ".join(command[1:]), "quantize_seconds": seconds,
                                "transformers_reload_ppl": perplexity(model, windows).perplexity}
            print(setting, json.dumps(results[setting]), flush=True)
            del model
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
