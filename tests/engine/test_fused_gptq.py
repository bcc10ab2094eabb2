"""Linears that share a Hessian (q/k/v, gate/up) quantized in one stacked GPTQ call give the separate results."""

import copy

import torch

import lowbit
from conftest import calibration_ids, tiny_model
from lowbit.engine.report import QuantizationReport
from lowbit.engine.sequential import Activations, collect_hessians, plan_model, quantize_layer
from lowbit.models.arch import find_decoder_layers


def test_stacked_gptq_equals_separate_calls():
    model = tiny_model("llama")
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "weights.bits": 3})
    decoder = find_decoder_layers(model)
    from lowbit.engine.sequential import capture_layer_inputs

    cpu = torch.device("cpu")
    hidden, kwargs = capture_layer_inputs(model, decoder, list(torch.split(calibration_ids(), 4)), cpu, cpu)
    results = {}
    for fuse in (False, True):
        copy_model = copy.deepcopy(model)
        layer = find_decoder_layers(copy_model).layers[0]
        targets = plan_model(copy_model, recipe).targets[0]
        with torch.no_grad():
            hessians, tokens, _ = collect_hessians(layer, targets, Activations(list(hidden), kwargs, cpu), cpu,
                                                QuantizationReport("gptq", ""), 0)
            results[fuse] = quantize_layer(targets, recipe, hessians, tokens, cpu, fuse_shared=fuse)
    (separate, separate_records), (fused, fused_records) = results[False], results[True]
    assert hessians["model.layers.0.self_attn.q_proj"] is hessians["model.layers.0.self_attn.v_proj"]
    for name, weight in separate.items():
        agree = (weight.codes == fused[name].codes).float().mean()
        assert agree > 0.999, name
        assert torch.allclose(weight.scale, fused[name].scale, rtol=1e-4)
    for a, b in zip(separate_records, fused_records, strict=True):
        assert a.name == b.name and abs(a.output_error - b.output_error) <= 1e-3 * a.output_error
