"""Writing checkpoints in the compressed-tensors "pack-quantized" format (what vLLM and transformers load).

Per quantized Linear the safetensors hold ``weight_packed`` (int32, packed with compressed-tensors' own
``pack_to_int32``), ``weight_scale`` (model dtype, ``[out, n_groups]``), ``weight_zero_point`` (asymmetric
only, packed along dim 0) and ``weight_shape``; ``config.json`` carries the ``quantization_config`` built from
compressed-tensors' own pydantic models, so the installed library validates it.

Decisions:
- GPTQ act-order without static groups needs a per-column group index (g_idx), which compressed-tensors
  0.20 no longer stores: saving such a model is refused with a message pointing at ``static_groups``.
- GPT-2's ``Conv1D`` has no compressed-tensors form (it targets ``nn.Linear``): those weights are stored as
  their dequantized values in the model dtype and the manifest marks them ``stored: dense``.
- Activation schemes go in each group's ``input_activations`` (strategy "token" and dynamic for per-token
  scales; "tensor" with an ``input_scale`` (and ``input_zero_point``) per Linear when static). With 8-bit
  integer weights and quantized activations the format is "int-quantized" (int8 ``weight``, what vLLM's W8A8
  int8 kernels read); fp8 weights use "float-quantized" (float8_e4m3fn ``weight``); everything else is packed.
- OWQ linears add ``owq_kept_weight`` / ``owq_kept_index`` next to their packed tensors (``lowbit.formats.owq``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from lowbit.engine.activations import input_quantizer
from lowbit.formats.integer import QuantizedWeight, signed_codes
from lowbit.formats.owq import OWQWeight
from lowbit.models.arch import iter_linears
from lowbit.recipe import ActivationScheme


def storage_format(weight: QuantizedWeight, activations: ActivationScheme | None) -> str:
    if weight.format == "fp8":
        return "float-quantized"
    if weight.bits == 8 and activations is not None:
        return "int-quantized"
    return "pack-quantized"


def activation_args(scheme: ActivationScheme) -> dict:
    return {
        "num_bits": scheme.bits,
        "type": "float" if scheme.format == "fp8" else "int",
        "symmetric": scheme.symmetric,
        "strategy": "token" if scheme.dynamic else "tensor",
        "dynamic": scheme.dynamic,
        "observer": None if scheme.dynamic else "minmax",
    }


def quantization_args(weight: QuantizedWeight, clip: str, act_order: bool) -> dict:
    strategy = "channel" if weight.group_size == -1 else "group"
    args = {
        "num_bits": weight.bits,
        "type": "float" if weight.format == "fp8" else "int",
        "symmetric": weight.symmetric,
        "strategy": strategy,
        "group_size": None if weight.group_size == -1 else weight.group_size,
        "observer": "mse" if clip == "mse" else "minmax",
        "dynamic": False,
    }
    if act_order and strategy == "group":
        args["actorder"] = "weight"
    return args


def compressed_module_tensors(weight: QuantizedWeight, dtype: torch.dtype, layout: str = "pack-quantized") -> dict[str, Tensor]:
    """The safetensors entries (without the module prefix) of one quantized Linear in ``layout``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if layout == "float-quantized":
        return {"weight": weight.codes.view(torch.float8_e4m3fn), "weight_scale": weight.scale.to(dtype)}
    if layout == "int-quantized":
        tensors = {"weight": weight.signed_codes(), "weight_scale": weight.scale.to(dtype)}
        if not weight.symmetric:
            tensors["weight_zero_point"] = weight.signed_zero()
        return tensors

    if weight.group_index is not None:
        raise ValueError(
            "this weight was quantized with GPTQ act-order without static groups; its per-column group index "
            "(g_idx) has no place in the compressed-tensors format. Re-run with gptq.static_groups: true"
        )
    tensors = {
        "weight_packed": _packed_codes(weight),
        "weight_scale": weight.scale.to(dtype),
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if not weight.symmetric:
        tensors["weight_zero_point"] = pack_to_int32(weight.signed_zero(), weight.bits, packed_dim=0)
    return tensors


def _packed_codes(weight: QuantizedWeight, rows_per_step: int | None = None) -> Tensor:
    """``pack_to_int32(weight.signed_codes(), bits)``, a block of rows at a time: packing runs along each row, so the
    result is the same, and its int16/int32 temporaries (11 bytes per weight) stay small: blocks of about 16M codes
    (0.2 GB of temporaries) by default, instead of 2.6 GB for a 70B gate_proj at once on a GPU."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if rows_per_step is None:
        rows_per_step = max(1, (1 << 24) // max(1, weight.codes.shape[1]))
    pieces = [pack_to_int32(signed_codes(codes, weight.bits), weight.bits) for codes in weight.codes.split(rows_per_step)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def input_quantizer_tensors(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """``input_scale``/``input_zero_point`` of a Linear with a static activation quantizer (none when dynamic)."""
    quantizer = input_quantizer(module)
    if quantizer is None or quantizer.scheme.dynamic:
        return {}
    tensors = {"input_scale": quantizer.scale.reshape(1).to(dtype)}
    if not quantizer.scheme.symmetric:
        offset = 1 << (quantizer.scheme.bits - 1)
        tensors["input_zero_point"] = (quantizer.zero.reshape(1) - offset).to(torch.int8)
    return tensors


def build_state_dict(
    model: nn.Module, weights: dict[str, QuantizedWeight], clip: str = "minmax", act_order: bool = False,
    activations: ActivationScheme | None = None, prepared: dict[str, dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], dict | None, set[str]]:
    """State dict in compressed-tensors form, the ``quantization_config`` dict, and the names stored dense.

    prepared: per linear name, its pack-quantized tensors already built (by ``compressed_module_tensors``, e.g. on
    the GPU while the weight was there); used instead of packing again."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    dtype = next(model.parameters()).dtype
    linears = dict(iter_linears(model))
    state = model.state_dict()
    seen_storage: dict[int, str] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output: dict[str, Tensor] = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen_storage and pointer != -1:
            if tied:
                continue  # a tied copy (lm_head of tied embeddings): transformers re-ties it at load
            tensor = tensor.clone()
        seen_storage.setdefault(pointer, key)
        output[key] = tensor.contiguous()

    groups: dict[tuple, list[str]] = defaultdict(list)
    formats: set[str] = set()
    dense: set[str] = set()
    for name, weight in weights.items():
        if not isinstance(linears[name], nn.Linear):
            dense.add(name)  # Conv1D: keep its (already dequantized) weight as is
            continue
        del output[f"{name}.weight"]
        layout = storage_format(weight, activations)
        formats.add(layout)
        packed = (prepared or {}).get(name) if layout == "pack-quantized" else None
        if packed is not None and packed["weight_scale"].dtype != dtype:
            packed = None  # prepared for another scale dtype (a layer of mixed dtypes): pack here, by this rule
        tensors = {**(packed if packed is not None else compressed_module_tensors(weight, dtype, layout)),
                   **input_quantizer_tensors(linears[name], dtype)}
        if isinstance(weight, OWQWeight):
            tensors.update(weight.checkpoint_tensors())  # lowbit.formats.owq: ignored by compressed-tensors
        for suffix, tensor in tensors.items():
            output[f"{name}.{suffix}"] = tensor.contiguous()
        args = quantization_args(weight, clip, act_order)
        groups[tuple(sorted((k, str(v)) for k, v in args.items()))].append(name)

    if not groups:
        return output, None, dense  # nothing with a compressed form (e.g. GPT-2): a plain dense checkpoint
    quantized = {name for names in groups.values() for name in names}
    ignore = sorted(name for name, module in linears.items() if isinstance(module, nn.Linear) and name not in quantized)
    config_groups = {}
    for index, names in enumerate(groups.values()):
        args = quantization_args(weights[names[0]], clip, act_order)
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{name.replace('.', '[.]')}$" for name in sorted(names)]
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=targets, weights=args, input_activations=None if activations is None else activation_args(activations),
            format=storage_format(weights[names[0]], activations))  # explicit: CT would infer int-quantized for W4A8
    if len(formats) != 1:
        raise ValueError(f"one checkpoint holds one storage format; these weights need {sorted(formats)}")
    config = QuantizationConfig(
        config_groups=config_groups,
        quant_method="compressed-tensors",
        format=formats.pop(),
        quantization_status="compressed",
        ignore=ignore,
    )
    return output, config.model_dump(mode="json", exclude_none=True), dense


def activation_scheme(args: dict) -> ActivationScheme:
    """The lowbit activation scheme of a compressed-tensors ``input_activations`` entry (the forms lowbit writes:
    int or float 8-bit, per-token dynamic or per-tensor static); anything else is refused by name."""
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic"))
    if (strategy, dynamic) not in (("token", True), ("tensor", False)):
        raise ValueError(f"input_activations with strategy {strategy!r} and dynamic {dynamic} are not supported by "
                         "lowbit's loader (it reads per-token dynamic and per-tensor static schemes)")
    return ActivationScheme(bits=args["num_bits"], format="fp8" if args.get("type") == "float" else "int",
                            dynamic=dynamic, symmetric=bool(args.get("symmetric", True)))


def _targets(model: nn.Module, group: dict, ignore: list[str]) -> list[tuple[str, nn.Module]]:
    import re

    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in ignore:
            continue
        for target in group.get("targets", []):
            if target.startswith("re:") and re.fullmatch(target[3:], name) or target == type(module).__name__:
                chosen.append((name, module))
                break
    return chosen


def attach_checkpoint_input_quantizers(model: nn.Module, folder, quantization_config: dict,
                                       clip_ratio: float = 1.0) -> int:
    """Install the activation quantizers a compressed-tensors checkpoint describes (transformers does not when it
    dequantizes at load); static scales are read from the checkpoint's ``input_scale`` tensors. ``clip_ratio``
    (from lowbit's manifest: compressed-tensors has no field for it) applies to dynamic scales. Returns how many
    Linears got one."""
    from pathlib import Path

    from safetensors import safe_open

    from lowbit.engine.activations import InputQuantizer, attach_input_quantizer

    static: dict[str, Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith((".input_scale", ".input_zero_point")):
                    static[key] = handle.get_tensor(key)
    count = 0
    ignore = list(quantization_config.get("ignore", []))
    for group in quantization_config.get("config_groups", {}).values():
        if not group.get("input_activations"):
            continue
        scheme = activation_scheme(group["input_activations"]).model_copy(update={"clip_ratio": clip_ratio})
        for name, module in _targets(model, group, ignore):
            if scheme.dynamic:
                quantizer = InputQuantizer(scheme)
            else:
                scale = static.get(f"{name}.input_scale")
                if scale is None:
                    raise ValueError(f"{name}: the checkpoint declares static activation scales but stores no input_scale")
                zero = static.get(f"{name}.input_zero_point")
                offset = float(1 << (scheme.bits - 1)) if scheme.format == "int" else 0.0
                zero = torch.full((1,), offset) if zero is None else zero.float() + offset
                quantizer = InputQuantizer(scheme, scale.float().reshape(()), zero.reshape(()))
            attach_input_quantizer(module, quantizer)
            count += 1
    return count
