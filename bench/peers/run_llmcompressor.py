"""Quantize an HF model with llm-compressor (GPTQ or AWQ) and write its dequantized weights.

Run inside the peer's venv (made by bench/peers/install.sh):

    .peers/llmcompressor/bin/python bench/peers/run_llmcompressor.py --model .peers/models/smollm2-135m-fp \
        --calibration calib.pt --scheme w3a16-asym-g64 --method gptq --out runs/peers/llmc-gptq-w3

Public API used: ``llmcompressor.oneshot`` with ``GPTQModifier`` (GPTQ, Frantar et al. 2022,
https://arxiv.org/abs/2210.17323) or ``AWQModifier`` + ``QuantizationModifier`` (AWQ, Lin et al. 2023,
https://arxiv.org/abs/2306.00978), the scheme given as a compressed-tensors ``QuantizationScheme`` on every
``Linear`` except ``lm_head``. Algorithm settings are llm-compressor's defaults and are recorded in
peer.json. The calibration set is the given token-id tensor, unshuffled, as a pre-tokenized dataset.
The fake-quantized weights come from compressed-tensors' ``fake_quantize`` with the scales/zero points
llm-compressor computed, so the folder holds exactly what its compressed checkpoint would decode to.
"""

from __future__ import annotations

from typing import Any

import peer_common as common

TOOL = "llmcompressor"


def cpu_only_workarounds() -> list[str]:
    """Shims needed to run llm-compressor 0.14.0.1 on a CPU-only torch; each is recorded in peer.json.

    AWQ pins its cached activations (``IntermediatesCache.pin_memory``) before the grid search, which raises
    "Cannot access accelerator device" without a GPU. Pinning only speeds host-to-device copies, so on a
    CPU-only machine (or with ``--device cpu``, which hides the GPUs) it is skipped; the numbers are unchanged.
    """
    import torch

    if torch.cuda.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    return ["IntermediatesCache.pin_memory skipped (CPU-only torch cannot pin memory; no numeric effect)"]


def build_recipe(method: str, scheme: common.Scheme) -> tuple[list[Any], dict[str, Any]]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy="group" if scheme.group_size else "channel",
        group_size=scheme.group_size,
    )
    config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        recipe = [GPTQModifier(config_groups=config_groups, ignore=["lm_head"])]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])]
    described = [
        {"modifier": type(modifier).__name__, **modifier.model_dump(exclude_none=True, mode="json")}
        for modifier in recipe
    ]
    return recipe, {"recipe": described}


def fake_quantize_weight(weight: Any, scale: Any, zero_point: Any, args: Any, g_idx: Any) -> Any:
    """``weight`` quantized and dequantized with llm-compressor's scales, zero points and group index."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_range

    if g_idx is None:
        return fake_quantize(weight, scale, zero_point, args)
    # activation-ordered groups ("group" actorder): column j belongs to group g_idx[j]
    column_scale = scale[:, g_idx.long()]
    column_zero = torch.zeros_like(column_scale) if zero_point is None else zero_point[:, g_idx.long()]
    low, high = calculate_range(args, weight.device)
    codes = torch.clamp(torch.round(weight / column_scale) + column_zero, low, high)
    return ((codes - column_zero) * column_scale).to(weight.dtype)


def dequantized_state_dict(model: Any) -> tuple[dict[str, Any], int]:
    """State dict with every quantized Linear's weight replaced by its fake-quantized value."""
    import torch

    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            state[f"{name}.weight"] = fake_quantize_weight(
                module.weight.detach(),
                module.weight_scale,
                getattr(module, "weight_zero_point", None),
                scheme.weights,
                getattr(module, "weight_g_idx", None),
            )
            count += 1
    return state, count


def main() -> None:
    parser = common.build_parser(__doc__, methods=("gptq", "awq"))
    args = parser.parse_args()
    scheme = common.parse_scheme(args.scheme)
    device = common.select_device(args.device)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = common.load_calibration_ids(args.calibration)
    num_samples, seqlen = ids.shape
    # oneshot's sequential pipeline onloads each layer to the first accelerator and back; loading the model on
    # the device first keeps what stays outside the layers (embeddings, head) there too
    model, tokenizer = common.load_model(args.model, device)
    recipe, config = build_recipe(args.method, scheme)
    workarounds = cpu_only_workarounds()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot_kwargs = {
        "num_calibration_samples": num_samples,
        "max_seq_length": seqlen,
        "shuffle_calibration_samples": False,
        "batch_size": 1,
    }
    with common.Timer() as timer:
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, **oneshot_kwargs)
        state, quantized_layers = dequantized_state_dict(model)
    if quantized_layers == 0:
        raise SystemExit("llm-compressor quantized no Linear layer; check the recipe and the model")
    missing = common.save_dequantized(args.model, state, args.out)
    common.write_ok(
        args.out,
        TOOL,
        args.method,
        scheme,
        ("llmcompressor", "compressed-tensors"),
        timer.seconds,
        config={**config, "oneshot": oneshot_kwargs},
        calibration={"file": str(args.calibration), "num_samples": num_samples, "seqlen": seqlen},
        workarounds=workarounds,
        device=device,
        quantized_layers=quantized_layers,
        not_replaced=missing,
    )


if __name__ == "__main__":
    main()
