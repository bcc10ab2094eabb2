import pytest
import torch

import lowbit
from conftest import calibration_ids, tiny_model
from lowbit.engine.sequential import capture_layer_inputs, plan_model, quantize_model
from lowbit.models.arch import find_decoder_layers


def test_every_linear_is_reported_once():
    model = tiny_model("qwen2")
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "ignore": [r".*\.mlp\.down_proj", "lm_head"]})
    _, report = quantize_model(model, recipe, calibration_ids(), progress=False)
    names = [r.name for r in report.linears]
    assert sorted(names) == sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    by_name = {r.name: r for r in report.linears}
    assert by_name["model.layers.0.mlp.down_proj"].status == "skipped"
    assert "ignore pattern" in by_name["model.layers.0.mlp.down_proj"].reason
    assert by_name["lm_head"].status == "skipped"
    quantized = [r for r in report.linears if r.status == "quantized"]
    assert len(quantized) == 2 * 6
    assert all(r.tokens == 8 * 32 and r.output_error is not None and r.dampening == 0.01 for r in quantized)


def test_shared_inputs_share_one_hessian_and_match_separate_accumulation():
    model = tiny_model("llama")
    ids = calibration_ids()
    decoder = find_decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, decoder, [ids], torch.device("cpu"), torch.device("cpu"))
    layer = decoder.layers[0]
    normed = layer.input_layernorm(hidden[0])
    expected = (normed.reshape(-1, 64).T @ normed.reshape(-1, 64)) / normed.reshape(-1, 64).shape[0]
    from lowbit.engine.calibration import Target, _HessianHooks

    targets = [Target(f"{n}", m, 0) for n, m in [("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj)]]
    hooks = _HessianHooks(targets, torch.device("cpu"))
    hooks.new_batch()
    with torch.no_grad():
        layer(hidden[0], **kwargs[0])
    hooks.remove()
    assert hooks.shared_with == {"k": "q"}
    assert torch.allclose(hooks.accumulator("k").hessian(), expected, atol=1e-5)


def test_sequential_gptq_lowers_output_error_versus_rtn_for_the_whole_model():
    ids = calibration_ids(n=16, seqlen=64)
    reference = tiny_model("llama")
    with torch.no_grad():
        expected = reference(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama")
        recipe = lowbit.Recipe(method=method).updated(**{"weights.bits": 3, "weights.symmetric": False, "weights.group_size": 32})
        lowbit.quantize(model, recipe, ids, progress=False)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - expected).norm() / expected.norm())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="0 tokens"):
        quantize_model(tiny_model("llama"), lowbit.Recipe().updated(**{"weights.group_size": 32}), torch.empty(0, 8, dtype=torch.long), progress=False)


def test_unused_linear_is_uncalibrated_error():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    layer.self_attn.extra_proj = torch.nn.Linear(64, 64)  # never called in forward
    with pytest.raises(ValueError, match="extra_proj received 0 calibration tokens"):
        quantize_model(model, lowbit.Recipe().updated(**{"weights.group_size": 32}), calibration_ids(), progress=False)


def test_plan_lists_linears_outside_layers():
    plan = plan_model(tiny_model("opt"), lowbit.Recipe().updated(**{"weights.group_size": 32}))
    assert [r.name for r in plan.left_alone] == ["lm_head"]
    assert len(plan.targets[0]) == 6


def test_a_failed_kernel_warm_up_costs_nothing_but_its_time(monkeypatch):
    """The GPTQ kernel warm-up runs on a side thread; when it fails, the run goes on (the first layer compiles the
    kernel itself) with the same result, and the report records no warm-up time."""
    from concurrent.futures import Future

    import lowbit.engine.sequential as sequential

    def failed(*_):
        future = Future()
        future.set_exception(RuntimeError("no GPU compiler"))
        return future

    model = tiny_model("llama")
    ids = calibration_ids(vocab=model.config.vocab_size)
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32})
    expected = lowbit.quantize(tiny_model("llama"), recipe, ids, progress=False)
    monkeypatch.setattr(sequential, "start_kernel_warm_up", failed)
    result = lowbit.quantize(model, recipe, ids, progress=False)
    assert "kernel_warm_up" not in result.report.background
    assert "kernel_warm_up_waited" in result.report.background
    assert all(torch.equal(result.weights[name].codes, weight.codes) for name, weight in expected.weights.items())
