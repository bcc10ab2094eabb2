"""SmoothQuant in the engine: exact folding, Hessians that follow the fold, lower error with outliers."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import calibration_ids, tiny_model, with_outlier_channels

import lowbit
from lowbit.algorithms.smoothquant import smoothing_scales
from lowbit.engine.report import QuantizationReport
from lowbit.engine.sequential import Activations, capture_layer_inputs, collect_hessians, plan_model
from lowbit.engine.smoothing import smooth_layer
from lowbit.models.arch import UnsupportedArchitectureError
from lowbit.recipe import Recipe


def _layer_stats(model, recipe, index=0):
    plan = plan_model(model, recipe)
    cpu = torch.device("cpu")
    hidden, kwargs = capture_layer_inputs(model, plan.decoder, [calibration_ids(4, 16)], cpu, cpu)
    layer = plan.decoder.layers[index]
    targets = plan.targets[index]
    hessians, _, stats = collect_hessians(layer, targets, Activations(list(hidden), kwargs, cpu), cpu,
                                          QuantizationReport("rtn", ""), index, observe=True, sample_rows=32)
    return plan, layer, targets, hidden, kwargs, hessians, stats


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "opt"])
def test_folding_is_exact_and_hessians_follow(family: str) -> None:
    model = tiny_model(family)
    recipe = Recipe(method="rtn").updated(**{"smoothquant.alpha": [0.3, 0.5, 0.8], "activations.bits": 8,
                                             "weights.group_size": 32})
    plan, layer, targets, hidden, kwargs, hessians, stats = _layer_stats(model, recipe)
    before = layer(hidden[0], **kwargs[0])[0] if isinstance(layer(hidden[0], **kwargs[0]), tuple) else layer(hidden[0], **kwargs[0])
    records = smooth_layer(layer, plan.decoder.name(0), 0, model.config.model_type, [t.name for t in targets],
                           hessians, stats, recipe)
    assert records and all(r.alpha in (0.3, 0.5, 0.8) and len(r.errors) == 3 for r in records)
    output = layer(hidden[0], **kwargs[0])
    after = output[0] if isinstance(output, tuple) else output
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    # the rescaled Hessians equal the ones measured on the smoothed layer
    fresh, _, fresh_stats = collect_hessians(layer, targets, Activations(list(hidden), kwargs, torch.device("cpu")),
                                             torch.device("cpu"), QuantizationReport("rtn", ""), 0, observe=True)
    for target in targets:
        assert torch.allclose(hessians[target.name], fresh[target.name], rtol=1e-3, atol=1e-6), target.name
        assert torch.allclose(stats[target.name].ranges.absmax, fresh_stats[target.name].ranges.absmax, rtol=1e-4)


def test_scales_are_finite_and_clamped() -> None:
    absmax = torch.tensor([0.0, 1e30, 1.0, float("inf")])
    weight = torch.tensor([[1.0, 1e-30, 0.0, 1.0]])
    scales = smoothing_scales(absmax, [weight], 0.5, min_scale=1e-5)
    assert torch.isfinite(scales).all() and (scales >= 1e-5).all() and (scales <= 1e5).all()
    assert scales[0] == 1.0 and scales[2] == 1.0  # dead channel, zero weights: untouched


@torch.no_grad()
def test_smoothquant_lowers_w8a6_error_with_outliers() -> None:
    base = with_outlier_channels(tiny_model("llama"), 40.0)
    ids = calibration_ids(8, 32)
    reference = base(ids[:2]).logits
    errors = {}
    for name, changes in {"rtn": {}, "smoothquant": {"smoothquant.alpha": [0.3, 0.5, 0.7]}}.items():
        recipe = Recipe(method="rtn").updated(**{"weights.bits": 8, "weights.group_size": -1,
                                                 "activations.bits": 6, **changes})
        quantized = lowbit.quantize(copy.deepcopy(base), recipe, ids, progress=False)
        errors[name] = float((quantized.model(ids[:2]).logits - reference).pow(2).mean() / reference.pow(2).mean())
        if name == "smoothquant":
            assert any(t["kind"] == "smoothquant" for t in quantized.report.transforms)
    assert errors["smoothquant"] < 0.7 * errors["rtn"], errors


def test_static_activation_scales_and_unsupported_family() -> None:
    model = tiny_model("llama")
    recipe = Recipe(method="rtn").updated(**{"weights.bits": 8, "weights.group_size": -1, "activations.bits": 8,
                                             "activations.dynamic": False})
    assert recipe.needs_calibration
    quantized = lowbit.quantize(model, recipe, calibration_ids(4, 16), progress=False)
    q_proj = quantized.model.model.layers[0].self_attn.q_proj
    assert q_proj.input_quantizer.scale.numel() == 1 and q_proj.input_quantizer.scale > 0
    assert all("A8 sym per-tensor static" in r.scheme for r in quantized.report.linears if r.status == "quantized")
    with pytest.raises(UnsupportedArchitectureError, match="NORM_TO_LINEARS"):
        lowbit.quantize(tiny_model("gpt2"), Recipe(method="rtn").updated(**{"smoothquant.alpha": 0.5, "weights.group_size": 32}),
                        calibration_ids(4, 16), progress=False)
