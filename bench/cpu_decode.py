"""Greedy decoding of the real SmolLM2-135M on the CPU: bf16 against lowbit's W4A16, W8A16 and W8A8-int8 checkpoints.

Every row goes through the user's path: a checkpoint folder written by ``lowbit.save`` (compressed-tensors), read
by ``lowbit.kernels.runtime.generate(folder, device="cpu")`` (the same call as ``lowbit generate --device cpu``).
The bf16 row is the unquantized model saved as a plain transformers folder and run by the same decoder. The
"dequantizing" rows force the fallback that dequantizes every weight on every call (what lowbit did on the CPU
before ``lowbit.kernels.cpu``), in the same run.

    python bench/cpu_decode.py --new-tokens 64 --threads 2 --out bench/notes/cpu_decode_session28.json

Each row is the median of ``--repeats`` generations (one for the slow dequantizing rows), run round-robin over the
schemes: a shared 2-core machine moves single runs by 30%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package that transformers imports: take this folder off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.kernels import cpu  # noqa: E402
from lowbit.kernels.runtime import generate  # noqa: E402
from lowbit.models.loading import load_model  # noqa: E402

PROMPT = "The history of the Roman Empire began when"


def _checkpoints(folder: Path, tokens: int) -> dict[str, Path]:
    model, tokenizer, source = load_model("smollm2-135m", dtype=torch.float32)
    paths = {"bf16": folder / "bf16"}
    # the model came from a GGUF file: transformers refuses to save a "gguf-quantized" model; its weights are plain
    # float tensors by now, so drop that mark
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.to(torch.bfloat16).save_pretrained(paths["bf16"])
    tokenizer.save_pretrained(paths["bf16"])
    schemes = {
        "w4a16 g64": {"weights.bits": 4, "weights.group_size": 64, "weights.symmetric": False, "weights.clip": "minmax"},
        "w8a16 g64": {"weights.bits": 8, "weights.group_size": 64, "weights.symmetric": True, "weights.clip": "minmax"},
        "w8a8 int8": {"weights.bits": 8, "weights.group_size": -1, "weights.clip": "minmax",
                      "activations": {"bits": 8, "dynamic": True}},
    }  # fmt: skip
    for name, fields in schemes.items():
        model, tokenizer, source = load_model("smollm2-135m", dtype=torch.float32)
        recipe = lowbit.Recipe(method="rtn").updated(**fields)
        quantized = lowbit.quantize(model, recipe, tokenizer=tokenizer, progress=False)
        quantized.source = source
        paths[name] = lowbit.save(quantized, folder / name.replace(" ", "-"))
    return paths


def _run(path: Path, tokens: int, force_dequantize: bool, compile_step: bool) -> dict:
    """One generation; ``force_dequantize`` makes the modules take the dequantizing fallback."""
    saved_refusal, saved_int8 = cpu.int4_cpu_refusal, cpu.w8a8_int8_mm_cpu
    if force_dequantize:
        from lowbit.kernels import reference

        cpu.int4_cpu_refusal = lambda packed, x: "forced by bench/cpu_decode.py"

        def reference_int8(x, weight, weight_scale):
            y = reference.w8a8_matmul_reference(x.reshape(-1, x.shape[-1]), weight, weight_scale)
            return y.reshape(*x.shape[:-1], weight.shape[0])

        cpu.w8a8_int8_mm_cpu = reference_int8
    try:
        start = time.perf_counter()
        text, result = generate(str(path), PROMPT, tokens, device="cpu", use_cuda_graph=False, compile_step=compile_step)
        total = time.perf_counter() - start
    finally:
        cpu.int4_cpu_refusal, cpu.w8a8_int8_mm_cpu = saved_refusal, saved_int8
    return {"tokens_per_s": result.tokens_per_second, "prefill_s": result.prefill_seconds,
            "decode_s": result.decode_seconds, "total_s": total, "text": text,
            "token_ids": result.tokens[0].tolist()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="generations per row; the median tokens/s is kept")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decode step (Inductor's C++ code)")
    parser.add_argument("--skip-dequantizing", action="store_true", help="leave out the slow dequantizing rows")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _checkpoints(Path(tmp), args.new_tokens)
        plan = [(name, path, False) for name, path in paths.items()]
        if not args.skip_dequantizing:
            plan += [(name, path, True) for name, path in paths.items() if name != "bf16"]
        runs: dict[str, list[dict]] = {}
        # round-robin: the machine's drift (a shared host moves single runs by 30%) falls on every scheme alike
        for repeat in range(args.repeats):
            for name, path, force in plan:
                if force and repeat:  # the dequantizing rows are slow and far apart: one run each
                    continue
                label = f"{name} (dequantizing)" if force else name
                run = _run(path, args.new_tokens, force, args.compile)
                runs.setdefault(label, []).append(run)
                print(f"{label}: {run['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        for label, label_runs in runs.items():
            speeds = [r["tokens_per_s"] for r in label_runs]
            rows.append({"scheme": label, **label_runs[0], "tokens_per_s": statistics.median(speeds),
                         "tokens_per_s_runs": speeds})  # fmt: skip
    base = rows[0]["tokens_per_s"]
    mode = "compiled decode step" if args.compile else "eager"
    print(f"SmolLM2-135M, CPU, {args.threads} threads, {mode}, {args.new_tokens} new tokens, prompt {PROMPT!r}\n")
    print("| scheme | decode tokens/s (median) | runs | vs bf16 | prefill s | tokens equal to bf16's, position by position |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        same = sum(a == b for a, b in zip(row["token_ids"], rows[0]["token_ids"], strict=True))
        runs = " / ".join(f"{v:.1f}" for v in row["tokens_per_s_runs"])
        print(f"| {row['scheme']} | {row['tokens_per_s']:.1f} | {runs} | {row['tokens_per_s'] / base:.2f}x | "
              f"{row['prefill_s']:.2f} | {same}/{len(row['token_ids'])} |")  # fmt: skip
    for row in rows:
        print(f"\n{row['scheme']}: {row['text'][:120]!r}")
    if args.out:
        info = {"threads": args.threads, "compile": args.compile, "new_tokens": args.new_tokens, "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
