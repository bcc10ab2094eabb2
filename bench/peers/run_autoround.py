"""Quantize an HF model with Intel's AutoRound (SignRound) and write its dequantized weights.

Run inside the peer's venv (made by bench/peers/install.sh):

    .peers/autoround/bin/python bench/peers/run_autoround.py --model .peers/models/smollm2-135m-fp \
        --calibration calib.pt --scheme w3a16-asym-g64 --out runs/peers/autoround-w3 [--iters 200]

Public API used: ``auto_round.AutoRound(model, tokenizer, bits=, group_size=, sym=, dataset=, iters=,
nsamples=, seqlen=, batch_size=, device_map=<--device>)`` and ``quantize()``, after which every tuned Linear
holds its quantized-dequantized weight in memory (Cheng et al. 2023, "Optimize Weight Rounding via Signed
Gradient Descent", https://arxiv.org/abs/2309.05516). Not ``quantize_and_save(format="fake")``: in 0.16.1
that export writes fp16 and then "restores" every tensor that was fp32 in the source folder from the
source, i.e. it would hand back the *unquantized* weights of an fp32 model. The calibration set is the given
token-id tensor, passed as a list of [1, seqlen] tensors (AutoRound then feeds them as they are).
``iters`` defaults to AutoRound's own default (200); fewer iterations are a different, cheaper config
and are recorded in peer.json. ``lm_head`` stays in full precision (AutoRound's default).
"""

from __future__ import annotations

from typing import Any

import peer_common as common

TOOL = "autoround"
DEFAULT_ITERS = 200


def quantized_state_dict(model: Any) -> dict[str, Any]:
    """The in-memory model's tensors; AutoRound has copied each tuned layer's qdq weight into ``weight``."""
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    meta = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if meta:
        raise SystemExit(
            f"AutoRound left {len(meta)} tensors on the meta device (e.g. {meta[0]}); cannot read them"
        )
    return state


def main() -> None:
    parser = common.build_parser(__doc__, methods=("autoround",))
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="SignRound iterations per block")
    parser.add_argument("--lr", type=float, default=None, help="SignRound learning rate (AutoRound's default: 1/iters)")
    parser.add_argument("--batch-size", type=int, default=8, help="AutoRound's calibration batch size")
    args = parser.parse_args()
    scheme = common.parse_scheme(args.scheme)
    device = common.select_device(args.device)

    import torch
    from auto_round import AutoRound

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = common.load_calibration_ids(args.calibration)
    num_samples, seqlen = ids.shape
    model, tokenizer = common.load_model(args.model)
    config = {
        "bits": scheme.bits,
        "group_size": scheme.group_size if scheme.group_size else -1,
        "sym": scheme.symmetric,
        "iters": args.iters,
        "nsamples": num_samples,
        "seqlen": seqlen,
        "batch_size": min(args.batch_size, num_samples),
        "device_map": device,
        "enable_torch_compile": False,
    }
    if args.lr is not None:
        config["lr"] = args.lr
    dataset = [ids[index : index + 1] for index in range(num_samples)]
    with common.Timer() as timer:
        rounder = AutoRound(model, tokenizer, dataset=dataset, **config)
        rounder.quantize()
        state = quantized_state_dict(rounder.model)
    missing = common.save_dequantized(args.model, state, args.out)
    common.write_ok(
        args.out,
        TOOL,
        args.method,
        scheme,
        ("auto-round",),
        timer.seconds,
        config={**config, "iters_is_default": args.iters == DEFAULT_ITERS},
        calibration={"file": str(args.calibration), "num_samples": num_samples, "seqlen": seqlen},
        device=device,
        not_replaced=missing,
    )


if __name__ == "__main__":
    main()
