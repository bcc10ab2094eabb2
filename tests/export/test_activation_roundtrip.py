"""Save -> load round trips of activation-quantized checkpoints (compressed-tensors input_activations)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import calibration_ids, tiny_model, with_outlier_channels

import lowbit
from lowbit.recipe import Recipe

SCHEMES = {
    "w8a8-int-dynamic": ({"weights.bits": 8, "weights.group_size": -1, "activations.bits": 8}, "int-quantized"),
    "w8a8-int-static": ({"weights.bits": 8, "weights.group_size": -1, "activations.bits": 8,
                         "activations.dynamic": False}, "int-quantized"),
    "w8a8-fp8": ({"weights.bits": 8, "weights.format": "fp8", "weights.group_size": -1, "activations.bits": 8,
                  "activations.format": "fp8"}, "float-quantized"),
    "w4a8-g32": ({"weights.bits": 4, "weights.group_size": 32, "activations.bits": 8}, "pack-quantized"),
    "w4a4-asym-static": ({"weights.bits": 4, "weights.symmetric": False, "weights.group_size": -1, "activations.bits": 4,
                          "activations.symmetric": False, "activations.dynamic": False}, "pack-quantized"),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(SCHEMES))
@torch.no_grad()
def test_activation_checkpoint_round_trip(name: str, tmp_path) -> None:
    changes, expected_format = SCHEMES[name]
    ids = calibration_ids(4, 16)
    quantized = lowbit.quantize(tiny_model("llama"), Recipe(method="rtn").updated(**changes), ids, progress=False)
    reference = quantized.model(ids).logits
    folder = lowbit.save(quantized, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == expected_format
    assert config["config_groups"]["group_0"]["input_activations"]["num_bits"] == changes["activations.bits"]

    loaded, _ = lowbit.load(folder)
    assert _relative(loaded(ids).logits, reference) <= 1e-5
    assert loaded.model.layers[0].mlp.down_proj.input_quantizer is not None

    if changes.get("weights.symmetric", True):  # plain transformers + compressed-tensors (asymmetric: llm-compressor#1618)
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert _relative(plain(ids).logits, reference) <= 1e-5

    # the activation quantization is really applied: without it the logits move
    for module in loaded.modules():
        if hasattr(module, "_lowbit_input_hook"):
            module._lowbit_input_hook.remove()
    assert _relative(loaded(ids).logits, reference) > 1e-4


@torch.no_grad()
def test_rotated_w4a4_gptq_round_trip_and_gain(tmp_path) -> None:
    """Rotation + GPTQ W4A4: the checkpoint reloads (online Hadamards re-installed from the manifest) with the same
    logits, and on a model with outlier channels the rotation lowers the error against full precision."""
    ids = calibration_ids(8, 32)
    base = with_outlier_channels(tiny_model("llama"), 30.0)
    reference = base(ids).logits
    errors = {}
    for rotate in (False, True):
        recipe = Recipe().updated(**{"weights.group_size": -1, "activations.bits": 4, "activations.clip_ratio": 0.9,
                                     **({"rotation.seed": 0} if rotate else {})})
        quantized = lowbit.quantize(copy.deepcopy(base), recipe, ids, progress=False)
        logits = quantized.model(ids).logits
        errors[rotate] = float((logits - reference).pow(2).mean() / reference.pow(2).mean())
        if rotate:
            assert quantized.report.transforms[0]["kind"] == "rotation"
            folder = lowbit.save(quantized, tmp_path / "rotated")
            loaded, _ = lowbit.load(folder)
            assert loaded.model.layers[0].mlp.down_proj.lowbit_online_hadamard == 128
            assert _relative(loaded(ids).logits, logits) <= 1e-5
    assert errors[True] < 0.5 * errors[False], errors
