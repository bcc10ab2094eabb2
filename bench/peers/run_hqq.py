"""Quantize an HF model with HQQ (Half-Quadratic Quantization) and write its dequantized weights.

Run inside the peer's venv (made by bench/peers/install.sh):

    .peers/hqq/bin/python bench/peers/run_hqq.py --model .peers/models/smollm2-135m-fp \
        --calibration calib.pt --scheme w3a16-asym-g64 --out runs/peers/hqq-w3

Public API used: ``hqq.models.hf.base.AutoHQQHFModel.quantize_model`` with ``BaseQuantizeConfig``
(Badri & Shaji 2023, https://mobiusml.github.io/hqq_blog/), then each ``HQQLinear.dequantize()``.
HQQ is data-free: the calibration file is read (to check it) but not used, and peer.json says so.

What HQQ can express: asymmetric quantization only (``W ~ (W_q - zero) * scale``), with a zero point that
its optimizer moves off the integer grid (a float per group). Symmetric schemes are reported "n/a".
Groups run along the input dimension (``axis=1``), like the other tools' ``group_size``; per-channel is
``group_size=None`` (one group per row).
"""

from __future__ import annotations

from typing import Any

import peer_common as common

TOOL = "hqq"


def quantize_config(scheme: common.Scheme) -> dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=scheme.bits, group_size=scheme.group_size, axis=1)


def dequantized_state_dict(model: Any) -> tuple[dict[str, Any], int]:
    """Original-named state dict where each HQQLinear contributes its dequantized weight (and bias)."""
    import torch
    from hqq.core.quantize import HQQLinear

    state: dict[str, Any] = {}
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, HQQLinear):
                state[f"{name}.weight"] = module.dequantize().float().cpu()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.float().cpu()
                count += 1
            elif not any(True for _ in module.children()):
                for param_name, tensor in module.state_dict().items():
                    state[f"{name}.{param_name}" if name else param_name] = tensor
    return state, count


def main() -> None:
    parser = common.build_parser(__doc__, methods=("hqq",))
    args = parser.parse_args()
    scheme = common.parse_scheme(args.scheme)
    device = common.select_device(args.device)
    ids = common.load_calibration_ids(args.calibration)
    if scheme.symmetric:
        common.write_not_available(
            args.out,
            TOOL,
            args.method,
            scheme,
            "HQQ quantizes asymmetrically only (scale and a float zero point per group, optimized by "
            "half-quadratic splitting); it has no symmetric mode",
            packages=("hqq",),
            device=device,
        )
        return

    import torch
    from hqq.models.hf.base import AutoHQQHFModel

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = common.load_model(args.model)
    config = quantize_config(scheme)
    with common.Timer() as timer:
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device=device)
        state, quantized_layers = dequantized_state_dict(model)
    if quantized_layers == 0:
        raise SystemExit("HQQ quantized no Linear layer; check that the model is a supported causal LM")
    missing = common.save_dequantized(args.model, state, args.out)
    common.write_ok(
        args.out,
        TOOL,
        args.method,
        scheme,
        ("hqq",),
        timer.seconds,
        config={"quant_config": config, "compute_dtype": "float32", "device": device},
        calibration={
            "file": str(args.calibration),
            "num_samples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]),
            "used": False,
            "note": "HQQ is data-free",
        },
        notes="zero points are floats optimized by HQQ (not on the integer grid)",
        quantized_layers=quantized_layers,
        device=device,
        not_replaced=missing,
    )


if __name__ == "__main__":
    main()
