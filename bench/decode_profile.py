"""Where the decode step's time goes: kernels per step, their device time, and the gaps between them.

Run on one GPU:  ``python bench/decode_profile.py --schemes bf16 w4a16 [--lm-head-quantized]``

For each scheme, the Llama-3-8B-shaped random model of ``bench/decode.py`` is prefilled (512 tokens) and its
decode step compiled and captured as in :func:`lowbit.kernels.runtime.greedy_decode`. Then:

* the step's time from CUDA-graph replays (CUDA events over 50 replays): what ``bench/decode.py`` measures;
* the same replays under ``torch.profiler``: the kernels per step, the sum of their device times, and so the
  idle time between kernels inside the graph (step time minus busy time);
* the kernels grouped into GEMM/GEMV (the quantized or bf16 projections), lm_head, attention and the rest, with
  each group's time, and the slowest kernel names.

Options compare launch settings in one call (``--fuse``, ``--persistent``, ``--pdl``, ``--l2-prefetch
GEMV:ATTENTION[L]``) and ``--tuned FILE ...`` seeds the W4A16 tuner with saved launches
(``bench/notes/decode_tuned_*.json``, one set of rows per file), so that a device call neither recompiles nor times
every candidate again; ``--persistent-config`` gives the persistent launch instead of tuning it (``bench/mlp_block.py``
writes the fastest as ``mlp_block_best.txt``). With four projection launches per layer (or q/k/v and the persistent
launch) the rows also give each launch's mean time inside the graph.

Prints one summary table and writes ``decode_profile.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import json
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.kernels import attention as attention_kernel
from lowbit.kernels import pdl, persistent, prefetch, runtime, w4a16
from lowbit.kernels.runtime import LLAMA3_8B, linear_factory, random_decoder

DEFAULT_ROPE_LAUNCH = dict(attention_kernel.ROPE_LAUNCH)


def load_tuned(path: Path) -> int:
    """Seed the W4A16 tuner with launches measured before (``{"(M, N, K, bits, group, symmetric)": "WNA16Config(...)"}``,
    e.g. a profile row's ``tuned``), so a device call does not spend minutes compiling and timing every candidate
    again. Returns how many shapes were seeded."""
    fields = [f.name for f in dataclasses.fields(w4a16.WNA16Config)]
    for key, text in json.loads(path.read_text()).items():
        text = text[0] if isinstance(text, list) else text
        body = re.fullmatch(r"WNA16Config\((.*)\)", text).group(1)
        values = dict(item.split("=") for item in body.split(", "))
        cfg = w4a16.WNA16Config(**{name: ast.literal_eval(values[name]) for name in fields if name in values})
        w4a16._TUNED[ast.literal_eval(key)] = cfg
    return len(w4a16._TUNED)


def capture_step(model, prompt: torch.Tensor, new_tokens: int):
    """Prefill, compile the decode step, capture it as a CUDA graph; returns the graph."""
    batch, prompt_len = prompt.shape
    model.setup_cache(batch, prompt_len + new_tokens + 1)
    ids = runtime.argmax_last(model(prompt, torch.arange(prompt_len, device=prompt.device)))
    pos = torch.tensor([prompt_len], device=prompt.device)
    torch._dynamo.reset()
    forward = torch.compile(lambda i, p: runtime.argmax_last(model(i, p)), dynamic=False)  # as greedy_decode

    def step() -> None:
        ids.copy_(forward(ids, pos))

    return w4a16.captured(step), step  # compiled and tuned on the main stream first, as greedy_decode does


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Mean ms of one replay of ``graph`` over ``replays`` back-to-back replays (CUDA events), after one untimed."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def classify(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("decode_attention"):
        return "attention"
    if lowered.startswith("triton_"):  # Inductor's fused elementwise kernels (named after the ops around them)
        return "other"
    if "wna16" in lowered or "mlp_block" in lowered or "w4_gemv" in lowered or "w4_mma" in lowered or "w8a8" in lowered or "gemv" in lowered or "gemm" in lowered \
            or "cutlass" in lowered or "sm90_xmma" in lowered or "nvjet" in lowered or "splitk" in lowered:
        return "linear"
    if "softmax" in lowered or "bmm" in lowered:
        return "attention"
    return "other"


def tuned_ms(shape: tuple[int, int, int], kind: str, cfg) -> float | None:
    """The tuner's device time (ms, flush included) of launch ``cfg`` for ``(M, N, K)`` and fusion ``kind``."""
    for key, timings in w4a16.TUNING_LOG.items():  # keys: (M, N, K, bits, group, symmetric) + (kind,) when fused
        if key[:3] == shape and (key[6] if len(key) > 6 else "") == kind:
            return next((ms for ms, c in timings if c == cfg), None)
    return None


@contextmanager
def recorded_launches():
    """Yield a dict that fills with the W4A16 launches chosen while the block runs (warm-up and capture of a step):
    ``str((M, N, K, fusion))`` -> ``[config, tuned ms]`` (ms None where the launch was not timed)."""
    used: dict[str, list] = {}
    real = w4a16.tuned_config

    def recording(x2, packed, fusion=None):
        cfg = real(x2, packed, fusion)
        kind = fusion.kind if fusion is not None else ""
        shape = (x2.shape[0], packed.out_features, packed.in_features)
        used[str((*shape, kind))] = [repr(cfg), tuned_ms(shape, kind, cfg)]
        return cfg

    w4a16.tuned_config = recording
    try:
        yield used
    finally:
        w4a16.tuned_config = real


@torch.no_grad()  # as greedy_decode: nothing records autograd (the decode-attention kernel has no backward)
def profile_scheme(
    scheme: str, batch: int, lm_head_quantized: bool, attention: str, replays: int = 50, fuse: str = "off",
    use_pdl: str = "off", l2_mb: tuple[float, float] = (0.0, 0.0), late_attention_prefetch: bool = False,
    persistent_mode: str = "off", attention_launch: str = "default",
) -> dict:
    runtime.ATTENTION[0] = attention
    launch = dict(DEFAULT_ROPE_LAUNCH)
    if attention_launch.startswith("cuda"):  # "cuda" or "cuda,SPLIT": lowbit.kernels.cuda_attention
        split = attention_launch.split(",")[1:]
        launch.update(kernel="cuda", cuda_split=int(split[0]) if split else None)
    elif attention_launch != "default":
        split, block_l, warps, new_slice = (int(v) for v in attention_launch.split(","))
        launch.update(split=split or None, block_l=block_l, num_warps=warps, new_slice=bool(new_slice))
    attention_kernel.ROPE_LAUNCH.update(launch)
    persistent.PERSISTENT[0] = persistent_mode
    runtime.FUSE[0], runtime.FUSE_LM_HEAD[0] = fuse.removesuffix("+head"), fuse.endswith("+head")
    pdl.PDL[0] = use_pdl
    prefetch.NEXT_MB[0], prefetch.ATTENTION_MB[0] = l2_mb
    prefetch.ATTENTION_LATE[0] = late_attention_prefetch
    make = linear_factory(scheme, "cuda")
    model = random_decoder(LLAMA3_8B, make, "cuda").fuse_projections()
    if lm_head_quantized and scheme != "bf16":
        model.lm_head = make(LLAMA3_8B.hidden_size, LLAMA3_8B.vocab_size)
    prompt = torch.randint(0, LLAMA3_8B.vocab_size, (batch, 512), device="cuda")
    with recorded_launches() as used:
        graph, step = capture_step(model, prompt, 128)
    step_ms = replay_ms(graph, replays)

    def kernels(prof) -> list:
        return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    in_graph = kernels(prof)
    source = "graph replays"
    calls = 10
    if len(in_graph) < 10:  # kineto saw no kernels inside the graph: profile the compiled step launched eagerly
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        in_graph = kernels(prof)
        source = "eager compiled step"
    busy_us = sum(e.device_time_total for e in in_graph) / calls
    groups: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(list)
    vocab_n = LLAMA3_8B.vocab_size
    for e in in_graph:
        groups[classify(e.name)] += e.device_time_total / calls
        by_name[e.name].append(e.device_time_total)
    top = sorted(((sum(v) / calls, len(v) // calls, k[:90]) for k, v in by_name.items()), reverse=True)[:15]
    # the projections' launches in step order: with 4 per layer (q/k/v, o, gate/up, down) and the lm_head last,
    # their mean time per position in the layer
    linear = sorted((e for e in in_graph if classify(e.name) == "linear"), key=lambda e: e.time_range.start)
    per_step = len(linear) // calls
    layers = LLAMA3_8B.num_layers
    slots = None
    names = {4: ["qkv", "o", "gate_up", "down"], 2: ["qkv", "mlp_block"]}.get((per_step - 1) // layers)
    if names and per_step == len(names) * layers + 1:  # (a bf16 lm_head is cuBLAS's, also classified "linear")
        n = len(names)
        durations = [[e.device_time_total for e in linear[i * per_step:(i + 1) * per_step]] for i in range(calls)]
        slots = {name: sum(sum(d[j] for j in range(slot, n * layers, n)) for d in durations) / (calls * layers)
                 for slot, name in enumerate(names)}  # fmt: skip
        slots["lm_head"] = sum(d[-1] for d in durations) / calls
    result = {
        "scheme": scheme + ("+lm_head" if lm_head_quantized and scheme != "bf16" else ""),
        "batch": batch,
        "attention": attention,
        "attention_launch": dict(launch),
        "fuse": fuse,
        "pdl": use_pdl,
        "persistent": persistent_mode,
        "persistent_config": {repr(k): repr(v) for k, v in persistent._TUNED.items()},
        "prefetch_blocks": pdl.PREFETCH_BLOCKS[0],
        "l2_next_mb": l2_mb[0],
        "l2_attention_mb": l2_mb[1],
        "l2_attention_late": late_attention_prefetch,
        "linear_us_by_projection": slots,
        "step_ms": step_ms,
        "tokens_per_s": batch * 1e3 / step_ms,
        "kernels_per_step": len(in_graph) / calls,
        "busy_ms": busy_us / 1e3,
        "idle_ms": step_ms - busy_us / 1e3,
        "profiled": source,
        "groups_ms": {k: v / 1e3 for k, v in groups.items()},
        "top": [{"us_per_step": t, "launches_per_step": n, "name": name} for t, n, name in top],
        "vocab": vocab_n,
        # (M, N, K, fusion) of each W4A16 launch in this row's step -> its launch, and the tuner's device time for it
        # (ms, with the flush; None where the launch was not timed, e.g. the untuned default inside a capture)
        "tuned": used,
    }
    del graph, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--schemes", nargs="*", default=["bf16", "w4a16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lm-head-quantized", action="store_true", help="also run each non-bf16 scheme with a "
                        "quantized lm_head")  # fmt: skip
    parser.add_argument("--quantized-head-only", action="store_true", help="with --lm-head-quantized: only the "
                        "rows with the quantized lm_head")  # fmt: skip
    parser.add_argument("--attention", nargs="*", default=["auto"], choices=["auto", "matmul", "reduce", "sdpa", "triton"])
    parser.add_argument("--fuse", nargs="*", default=[runtime.FUSE[0]], choices=["off", "auto", "glu", "auto+head"],
                        help="lowbit.kernels.runtime.FUSE values to compare (non-bf16 schemes); +head: also "
                        "FUSE_LM_HEAD (the final norm inside the lm_head's launch)")  # fmt: skip
    parser.add_argument("--persistent", nargs="*", default=["off"], choices=["off", "auto"],
                        help="lowbit.kernels.persistent.PERSISTENT values to compare (o, norm, gate/up, SwiGLU and "
                        "down as one launch; non-bf16 schemes)")  # fmt: skip
    parser.add_argument("--persistent-config", help="the persistent launch for Llama-3-8B's W4A16 g128 shape instead "
                        "of tuning it: warps,per_sm,bn_o,kbi_o,bn_gu,kbi_gu,bn_d,kbi_d,split_o,split_d,norm_split (bench/mlp_block.py)")  # fmt: skip
    parser.add_argument("--pdl", nargs="*", default=["off"], choices=["off", "early", "late", "attention"],
                        help="lowbit.kernels.pdl.PDL values to compare (programmatic dependent launch)")
    parser.add_argument("--prefetch-blocks", type=int, default=pdl.PREFETCH_BLOCKS[0],
                        help="K-blocks each W4A16 program prefetches into L2 before its PDL wait")
    parser.add_argument("--l2-prefetch", nargs="*", default=["0:0"],
                        help="GEMV:attention megabytes pairs to compare: lowbit.kernels.prefetch.NEXT_MB and "
                        "ATTENTION_MB (L2 prefetch of the next weights); a trailing L: the attention "
                        "prefetches after its work (ATTENTION_LATE)")  # fmt: skip
    parser.add_argument("--attention-launch", nargs="*", default=["default"],
                        help="fused decode-attention launches to compare: 'default' (attention.ROPE_LAUNCH) or "
                        "SPLIT,BLOCK_L,WARPS,NEW_SLICE (SPLIT 0: default_split; NEW_SLICE 0/1) or cuda[,SPLIT] "
                        "(lowbit.kernels.cuda_attention)")  # fmt: skip
    parser.add_argument("--tuned", type=Path, nargs="*", default=[],
                        help="seed the tuner with these launches (see load_tuned); several files: one set of rows "
                        "per file, each with only that file's launches seeded")  # fmt: skip
    args = parser.parse_args()
    pdl.PREFETCH_BLOCKS[0] = args.prefetch_blocks
    if args.persistent_config:
        from mlp_block import parse_config

        cfg = parse_config(args.persistent_config)
        key = (LLAMA3_8B.hidden_size, LLAMA3_8B.intermediate_size, 128, True, torch.bfloat16)  # as tuned_config keys
        persistent._TUNED[key] = cfg
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seeds in args.tuned or [None]:
        if seeds is not None:
            w4a16._TUNED.clear()
            print(f"seeded {load_tuned(seeds)} tuned shapes from {seeds}", flush=True)
        profile_all(args, seeds, rows)
    print_table(rows)


def parse_l2(pair: str) -> tuple[tuple[float, float], bool]:
    """``"GEMV:ATTENTION[L]"`` megabytes -> ``((gemv, attention), late)``."""
    gemv, attention = pair.split(":")
    return (float(gemv), float(attention.rstrip("L"))), attention.endswith("L")


def profile_all(args: argparse.Namespace, seeds: Path | None, rows: list[dict]) -> None:
    """Profile every requested variant, appending to ``rows`` and rewriting the JSON after each."""
    for scheme in args.schemes:
        variants = [False, True] if args.lm_head_quantized and scheme != "bf16" else [False]
        if args.quantized_head_only and scheme != "bf16":
            variants = [True]
        fuses = args.fuse if scheme != "bf16" else ["off"]
        persistents = args.persistent if scheme != "bf16" else ["off"]
        runs = [(v, a, f, p, mb, pm, al) for v in variants for a in args.attention for f in fuses for p in args.pdl
                for mb in args.l2_prefetch for pm in persistents for al in args.attention_launch]  # fmt: skip
        for quantized_head, attention, fuse, use_pdl, mb, pm, al in runs:
            l2_mb, late = parse_l2(mb)
            row = profile_scheme(scheme, args.batch, quantized_head, attention, fuse=fuse, use_pdl=use_pdl,
                                 l2_mb=l2_mb, late_attention_prefetch=late, persistent_mode=pm,
                                 attention_launch=al)  # fmt: skip
            row["seeded_from"] = str(seeds) if seeds else None
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
            if row["linear_us_by_projection"]:
                print("    per launch, us: " + ", ".join(f"{k} {v:.2f}" for k, v in row["linear_us_by_projection"].items()))
            for t in row["top"]:
                print(f"    {t['us_per_step']:9.1f} us  x{t['launches_per_step']:<4d} {t['name']}", flush=True)
            (args.out / "decode_profile.json").write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print("| scheme | attention | attention launch | fuse | persistent | pdl | L2 MB (GEMV:attention) | batch | step ms | tokens/s | kernels/step | busy ms | idle ms | linear ms | attention ms | other ms | seeded from |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["groups_ms"]
        launch = ",".join(str(v) for v in r["attention_launch"].values())
        print(f"| {r['scheme']} | {r['attention']} | {launch} | {r['fuse']} | {r.get('persistent', 'off')} | {r['pdl']} | {r['l2_next_mb']:g}:{r['l2_attention_mb']:g}{'L' if r['l2_attention_late'] else ''} | {r['batch']} | {r['step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['kernels_per_step']:.0f} | {r['busy_ms']:.3f} | {r['idle_ms']:.3f} | {g.get('linear', 0):.3f} | "
              f"{g.get('attention', 0):.3f} | {g.get('other', 0):.3f} | {r.get('seeded_from')} |")  # fmt: skip


if __name__ == "__main__":
    main()
