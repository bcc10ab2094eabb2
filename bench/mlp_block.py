"""The second half of a decoder layer at batch 1: one persistent launch against the separate launches.

Run on one GPU:  ``python bench/mlp_block.py [--tuned bench/notes/decode_tuned_h200_session10.json]``

Llama-3-8B's sizes (hidden 4096, intermediate 14336), W4A16 g128 symmetric, bf16. ``LAYERS`` distinct weight sets
(about 100 MB each, so the L2 holds no layer's weights from its last use) are run in a chain, ``h = mlp(attn, h)``,
as a decode step runs its layers, and the chain is timed by CUDA-graph replay (device time per layer):

* ``unfused``: the decode step's path with ``PERSISTENT`` off, compiled by torch.compile as ``greedy_decode`` compiles
  it: the o GEMV, Inductor's residual add + RMSNorm, the gate/up GEMV, SwiGLU, the down GEMV and the add
  (:class:`lowbit.kernels.runtime.Block`'s code; the GEMV launches tuned, or seeded with ``--tuned``);
* each :class:`lowbit.kernels.persistent.MLPBlockConfig` candidate of :func:`lowbit.kernels.persistent.candidate_configs`
  (and ``--configs``), with its grid (programs resident) and its error against the unfused chain's output.

Writes ``mlp_block.json`` under ``--out`` and prints a table with each launch's ratio to the unfused chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F

from lowbit.kernels import persistent, w4a16
from lowbit.kernels.linear import WeightOnly, WNA16Linear, concat_outputs

H, INTER, EPS = 4096, 14336, 1e-5


def make_layers(count: int) -> list[tuple]:
    def make(k: int, n: int) -> WNA16Linear:
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(linear.weight, std=k**-0.5)
        return WNA16Linear.from_linear(linear, WeightOnly(4, 128, True))

    layers = []
    for _ in range(count):
        norm = (torch.rand(H, device="cuda") + 0.5).to(torch.bfloat16)
        layers.append((make(H, H), concat_outputs([make(H, INTER), make(H, INTER)]), make(INTER, H), norm))
    return layers


def unfused(attn, x, o, gate_up, down, norm):
    """runtime.Block's second half with PERSISTENT and FUSE off."""
    x = x + o(attn)
    h = F.rms_norm(x, (H,), norm, EPS)
    gate, up = gate_up(h).chunk(2, dim=-1)
    return x + down(F.silu(gate) * up)


def graph_ms(fn, replays: int = 20) -> float:
    """Device ms of one ``fn()`` from CUDA-graph replays (after a warm-up on a side stream)."""
    from decode_profile import replay_ms

    return replay_ms(w4a16.captured(fn), replays)


def parse_config(text: str) -> persistent.MLPBlockConfig:
    """A launch from its field values in order, comma-separated (as ``dataclasses.astuple`` gives them)."""
    fields = dataclasses.fields(persistent.MLPBlockConfig)
    values = [v == "True" if f.type in (bool, "bool") else int(v) for f, v in zip(fields, text.split(","), strict=False)]
    return persistent.MLPBlockConfig(*values)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tuned", type=Path, help="seed the W4A16 tuner (decode_profile.load_tuned)")
    parser.add_argument("--configs", nargs="*", default=[], help="more launches: warps,per_sm,bn_o,kbi_o,bn_gu,"
                        "kbi_gu,bn_d,kbi_d,split_o,split_d,norm_split")  # fmt: skip
    parser.add_argument("--only", action="store_true", help="only the --configs launches, not the candidates")
    parser.add_argument("--breakdown", type=int, default=2, help="for the fastest N launches, also time the phases "
                        "as separate launches and each phase alone")  # fmt: skip
    args = parser.parse_args()
    if args.tuned:
        from decode_profile import load_tuned

        print(f"seeded {load_tuned(args.tuned)} tuned shapes from {args.tuned}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    layers = make_layers(args.layers)
    gen = torch.Generator(device="cuda").manual_seed(0)
    attn = torch.randn(1, 1, H, device="cuda", generator=gen).to(torch.bfloat16)
    x0 = torch.randn(1, 1, H, device="cuda", generator=gen).to(torch.bfloat16)

    def eager_chain() -> torch.Tensor:
        x = x0
        for o, gate_up, down, norm in layers:
            x = unfused(attn, x, o, gate_up, down, norm)
        return x

    chain_unfused = torch.compile(eager_chain, dynamic=False)  # one graph of all layers, as the decode step

    def chain(cfg, phases=None) -> torch.Tensor:
        x = x0
        for o, gate_up, down, norm in layers:
            x = persistent.mlp_block(attn, x, o, gate_up, down, norm, EPS, cfg, phases=phases)
        return x

    reference = chain_unfused().float()
    base_ms = graph_ms(chain_unfused) / args.layers
    rows = [{"launch": "unfused", "us_per_layer": base_ms * 1e3, "ratio": 1.0, "rel_err": 0.0}]
    print(f"unfused: {base_ms * 1e3:.2f} us per layer", flush=True)
    configs = [parse_config(c) for c in args.configs]
    if not args.only:
        configs = persistent.candidate_configs() + configs
    for cfg in configs:
        try:
            got = chain(cfg).float()
            err = ((got - reference).norm() / reference.norm()).item()
            ms = graph_ms(lambda cfg=cfg: chain(cfg)) / args.layers
        except Exception as exc:  # out of registers or shared memory: recorded, the others go on
            print(f"{cfg}: failed: {exc}", flush=True)
            rows.append({"launch": repr(cfg), "error": str(exc)})
            continue
        grid = next((g for key, g in persistent._GRIDS.items() if key[0] == cfg), None)
        row = {"launch": repr(cfg), "us_per_layer": ms * 1e3, "ratio": base_ms / ms, "rel_err": err, "grid": grid,
               "registers": persistent.REGISTERS.get(cfg),
               "csv": ",".join(str(v) for v in dataclasses.astuple(cfg))}
        rows.append(row)
        print(f"{cfg}: {ms * 1e3:.2f} us per layer ({base_ms / ms:.3f}x), grid {grid}, {row['registers']} registers, "
              f"rel. error {err:.2e}", flush=True)  # fmt: skip
        (args.out / "mlp_block.json").write_text(json.dumps(rows, indent=1))
    timed = sorted((r for r in rows[1:] if "us_per_layer" in r), key=lambda r: r["us_per_layer"])
    if timed:  # for --persistent-config of bench/decode_profile.py
        (args.out / "mlp_block_best.txt").write_text(timed[0]["csv"] + "\n")
    for r in timed[: args.breakdown]:  # where the time goes: the phases as separate launches, and each alone
        cfg = parse_config(r["csv"])
        phases = persistent.all_phases(cfg)
        r["phased_us"] = graph_ms(lambda cfg=cfg, p=phases: chain(cfg, p)) / args.layers * 1e3
        r["phase_us"] = {p: graph_ms(lambda cfg=cfg, p=p: chain(cfg, (p,))) / args.layers * 1e3 for p in phases}
        print(f"{cfg}: barriers {r['us_per_layer']:.2f} us, phases as launches {r['phased_us']:.2f} us, each alone "
              + ", ".join(f"{p}: {us:.2f}" for p, us in r["phase_us"].items()), flush=True)  # fmt: skip
    (args.out / "mlp_block.json").write_text(json.dumps(rows, indent=1))
    print("| launch | grid | us per layer | vs unfused | rel. error |")
    print("|---|---|---|---|---|")
    for r in sorted((r for r in rows if "us_per_layer" in r), key=lambda r: r["us_per_layer"]):
        print(f"| {r['launch']} | {r.get('grid', '-')} | {r['us_per_layer']:.2f} | {r['ratio']:.3f}x | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
