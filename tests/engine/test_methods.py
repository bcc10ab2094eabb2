"""AWQ, the Hessian-aware grids (LeanQuant, two-stage) and block-wise reconstruction wired into the engine: each
lowers the objective it claims to lower against plain RTN/GPTQ on a tiny model, the checkpoints load with the same
logits in lowbit and plain transformers, and bad combinations fail with a message saying what to do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from tests.conftest import calibration_ids, make_model_folder, tiny_model, with_outlier_channels, word_text
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
from typer.testing import CliRunner

import lowbit
from lowbit.engine.awq import awq_layer, block_path
from lowbit.engine.calibration import Activations, capture_layer_inputs
from lowbit.engine.sequential import plan_model
from lowbit.models.arch import UnsupportedArchitectureError
from lowbit.recipe import Recipe

W3 = {"weights.bits": 3, "weights.group_size": 32, "weights.symmetric": False, "calibration.batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def _logit_error(model: torch.nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference).pow(2).mean() / reference.pow(2).mean())


def _run(base: torch.nn.Module, recipe: Recipe, ids: torch.Tensor):
    return lowbit.quantize(copy.deepcopy(base), recipe, ids, progress=False)


def _layer_errors(quantized, layer: int = 0) -> dict[str, float]:
    return {r.name: r.output_error for r in quantized.report.linears if r.layer == layer and r.status == "quantized"}


def test_block_paths() -> None:
    assert block_path(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) == "self_attn"
    assert block_path(("mlp.gate_proj", "mlp.up_proj")) == "mlp"
    assert block_path(("mlp.down_proj",)) == "mlp.down_proj"
    assert block_path(("fc1", "self_attn.q_proj")) == ""


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_awq_folding_is_exact_and_never_worse_than_no_scaling(family: str) -> None:
    model = tiny_model(family)
    recipe = Recipe(method="rtn").updated(**W3, **{"awq.grid": 8})
    plan = plan_model(model, recipe)
    cpu = torch.device("cpu")
    hidden, kwargs = capture_layer_inputs(model, plan.decoder, [calibration_ids(4, 16)], cpu, cpu)
    layer = plan.decoder.layers[0]

    def output():
        result = layer(hidden[0], **kwargs[0])
        return result[0] if isinstance(result, tuple) else result

    before = output()
    records = awq_layer(layer, plan.decoder.name(0), 0, model.config.model_type, [t.name for t in plan.targets[0]],
                        Activations(list(hidden), kwargs, cpu), cpu, recipe)
    assert len(records) >= 2 and all(r["kind"] == "awq" for r in records)
    assert all(r["loss"] <= r["baseline_loss"] for r in records)
    assert torch.allclose(before, output(), rtol=1e-4, atol=1e-5)  # scales folded exactly


def test_awq_lowers_rtn_and_gptq_error_with_outlier_channels() -> None:
    base = with_outlier_channels(tiny_model("llama"), 20.0)
    ids = calibration_ids(8, 32)
    with torch.no_grad():
        reference = base(ids).logits
    errors = {}
    for name, changes in {"rtn": {"method": "rtn"}, "rtn+awq": {"method": "rtn", "awq.grid": 10},
                          "gptq": {}, "gptq+awq": {"awq.grid": 10}}.items():
        quantized = _run(base, Recipe().updated(**W3, **changes), ids)
        errors[name] = _logit_error(quantized.model, reference, ids)
        if "awq" in name:
            scaled = [t for t in quantized.report.transforms if t["kind"] == "awq"]
            assert len(scaled) == 6 and any(t["alpha"] > 0 and t["loss"] < t["baseline_loss"] for t in scaled)
            assert all(r.method.endswith("+awq_clip") for r in quantized.report.linears if r.status == "quantized")
    assert errors["rtn+awq"] < 0.5 * errors["rtn"], errors
    assert errors["gptq+awq"] < 0.8 * errors["gptq"], errors


@pytest.mark.parametrize("changes", [{"gptq.grid": "leanquant"}, {"gptq.grid": "two_stage"},
                                     {"gptq.grid": "two_stage", "two_stage.stage1": "static"},
                                     {"gptq.grid": "two_stage", "two_stage.stage1": "off"}])
def test_hessian_aware_grids_lower_the_layerwise_error_of_gptq(changes: dict) -> None:
    """Layer 0 sees the same inputs in both runs, so its linears' ||(W - Q) X||^2 compare directly."""
    base = with_outlier_channels(tiny_model("llama"), 20.0)
    ids = calibration_ids(8, 32)
    plain = _layer_errors(_run(base, Recipe().updated(**W3, **{"weights.clip": "minmax"}), ids))
    quantized = _run(base, Recipe().updated(**W3, **{"weights.clip": "minmax"}, **changes), ids)
    errors = _layer_errors(quantized)
    assert sum(errors.values()) < 0.9 * sum(plain.values()), (errors, plain)
    if changes.get("two_stage.stage1") == "off":  # stage 2 alone: the same GPTQ codes, refined scales
        assert all(errors[name] <= plain[name] * (1 + 1e-4) for name in plain), (errors, plain)
        refined = [t for t in quantized.report.transforms if t["kind"] == "layerwise_grid"]
        assert refined and all(t["stage2_output_error"]["after"] < t["stage2_output_error"]["before"] for t in refined)


def test_blockwise_lowers_block_output_error_and_logits_error() -> None:
    base = tiny_model("llama")
    ids = calibration_ids(8, 32)
    with torch.no_grad():
        reference = base(ids).logits
    plain = _run(base, Recipe().updated(**W3), ids)
    refined = _run(base, Recipe().updated(**W3, **{"blockwise.iterations": 40}), ids)
    records = [t for t in refined.report.transforms if t["kind"] == "blockwise"]
    assert [r["layer"] for r in records] == [0, 1]
    assert all(r["block_output_mse"]["after"] < r["block_output_mse"]["before"] for r in records), records
    assert _logit_error(refined.model, reference, ids) < _logit_error(plain.model, reference, ids)
    # the exported weights are what the model computes with
    module = refined.model.model.layers[1].mlp.down_proj
    exported = refined.weights["model.layers.1.mlp.down_proj"]
    assert torch.equal(module.weight, exported.dequantize(module.weight.dtype))
    assert all(r.method == "gptq+blockwise" for r in refined.report.linears if r.status == "quantized")


def test_blockwise_full_precision_target_matches_the_unquantized_model_stream() -> None:
    """Layer 0 sees the model's own inputs either way; from layer 1 on the full-precision target also holds the
    error the earlier quantized layers left, so its starting block error is larger, and the refined model is
    still closer to the original than plain GPTQ."""
    base = tiny_model("llama")
    ids = calibration_ids(8, 32)
    with torch.no_grad():
        reference = base(ids).logits
    plain = _run(base, Recipe().updated(**W3), ids)
    runs = {target: _run(base, Recipe().updated(**W3, **{"blockwise.iterations": 40, "blockwise.target": target}), ids)
            for target in ("quantized", "full_precision")}
    first = {target: [t for t in q.report.transforms if t["kind"] == "blockwise"] for target, q in runs.items()}
    assert first["full_precision"][0]["block_output_mse"]["before"] == pytest.approx(
        first["quantized"][0]["block_output_mse"]["before"], rel=1e-5)
    assert first["full_precision"][1]["block_output_mse"]["before"] > first["quantized"][1]["block_output_mse"]["before"]
    assert _logit_error(runs["full_precision"].model, reference, ids) < _logit_error(plain.model, reference, ids)


def test_blockwise_from_rtn_and_every_linear_reported() -> None:
    model = tiny_model("qwen3")
    quantized = _run(model, Recipe(method="rtn").updated(**W3, **{"blockwise.iterations": 5, "blockwise.start": "rtn"}),
                     calibration_ids(4, 16))
    counts = quantized.report.counts()
    linears = sum(1 for _, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert counts["quantized"] + counts["skipped"] == linears and counts["uncalibrated"] == 0


def test_combined_recipe_round_trips_through_lowbit_and_transformers(tmp_path) -> None:
    """Plain transformers loads asymmetric pack-quantized checkpoints with ``CompressedTensorsConfig(dequantize=True)``
    (without it, transformers 5.23 + compressed-tensors 0.20 allocate unpacked zero points and refuse the packed
    ones: llm-compressor issue 1618), as the bench does."""
    model = with_outlier_channels(tiny_model("llama"), 20.0)
    ids = calibration_ids(8, 32)
    recipe = Recipe().updated(**W3, **{"awq.grid": 6, "gptq.grid": "two_stage", "blockwise.iterations": 10})
    quantized = lowbit.quantize(model, recipe, ids, progress=False)
    with torch.no_grad():
        expected = quantized.model(ids).logits
    out = lowbit.save(quantized, tmp_path / "out")
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    kinds = {t["kind"] for t in manifest["report"]["transforms"]}
    assert kinds == {"awq", "layerwise_grid", "blockwise"}
    assert manifest["recipe"]["awq"]["grid"] == 6 and manifest["recipe"]["gptq"]["grid"] == "two_stage"
    loaded, _ = lowbit.load(out)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        for other in (loaded, plain):
            logits = other(ids).logits
            assert float((logits - expected).norm() / expected.norm()) < 1e-5


def test_cli_flags_stream_awq_and_blockwise(tmp_path, tokenizer_folder) -> None:
    from lowbit.cli import app

    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text = word_text(tmp_path / "text.txt", 3000)
    out = tmp_path / "q"
    result = CliRunner().invoke(app, [
        "quantize", str(folder), "--bits", "4", "--group-size", "32", "--awq", "--gptq-grid", "two-stage",
        "--blockwise-iters", "4", "--blockwise-target", "full-precision", "--calibration", str(text),
        "--num-samples", "4", "--seqlen", "32", "--device", "cpu", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["recipe"]["awq"] is not None and manifest["recipe"]["blockwise"]["iterations"] == 4
    assert manifest["recipe"]["blockwise"]["target"] == "full_precision"
    assert manifest["recipe"]["gptq"]["grid"] == "two_stage"
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # the folded norms were written with the layer: the checkpoint still computes (nearly) the original function
    assert not torch.equal(source.model.layers[0].input_layernorm.weight, plain.model.layers[0].input_layernorm.weight)
    ids = calibration_ids(2, 16)
    assert _logit_error(plain, source(ids).logits.detach(), ids) < 0.05


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": "rtn", "gptq.grid": "leanquant"}, "set method: gptq"),
    ({"awq.grid": 10, "smoothquant.alpha": 0.5}, "keep one of them"),
    ({"blockwise.iterations": 5, "gptq.static_groups": False}, "gptq.static_groups: true"),
    ({"method": "rtn", "weights.format": "fp8", "weights.bits": 8, "weights.group_size": -1, "awq.grid": 10},
     "integer grids"),
    ({"awq.grid": 1}, "greater than or equal to 2"),
    ({"blockwise.clip_floor": 0.0}, "greater than 0"),
    ({"two_stage.stage1": "always"}, "'off', 'static' or 'in_gptq'"),
])
def test_recipe_validation_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Recipe().updated(**changes)


def test_awq_needs_calibration_and_a_known_family() -> None:
    recipe = Recipe(method="rtn").updated(**{"awq.grid": 4, "weights.group_size": 32})
    assert recipe.needs_calibration and Recipe(method="rtn").updated(**{"blockwise.iterations": 3}).needs_calibration
    with pytest.raises(ValueError, match="^awq needs calibration data"):
        lowbit.engine.sequential.quantize_model(tiny_model("llama"), recipe, None, progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="NORM_TO_LINEARS"):
        lowbit.quantize(tiny_model("gpt2"), recipe, calibration_ids(4, 16), progress=False)


@pytest.mark.parametrize("changes", [{"awq.grid": 4}, {"gptq.grid": "leanquant"}, {"gptq.grid": "two_stage"},
                                     {"gptq.grid": "two_stage", "two_stage.stage1": "static"}])
def test_grids_on_stacked_rows_equal_separate_calls(changes: dict) -> None:
    """On a GPU, q/k/v and gate/up are quantized in one call on their stacked rows: every grid method works row
    by row, so each linear gets what it would get alone."""
    from lowbit.engine.calibration import collect_hessians
    from lowbit.engine.report import QuantizationReport
    from lowbit.engine.sequential import quantize_layer

    model = tiny_model("llama")
    recipe = Recipe().updated(**W3, **changes)
    cpu = torch.device("cpu")
    plan = plan_model(model, recipe)
    hidden, kwargs = capture_layer_inputs(model, plan.decoder, list(torch.split(calibration_ids(8, 32), 4)), cpu, cpu)
    results = {}
    for fuse in (False, True):
        copied = copy.deepcopy(model)
        copied_plan = plan_model(copied, recipe)
        with torch.no_grad():
            hessians, tokens, _ = collect_hessians(copied_plan.decoder.layers[0], copied_plan.targets[0],
                                                   Activations(list(hidden), kwargs, cpu), cpu,
                                                   QuantizationReport("gptq", ""), 0)
            results[fuse] = quantize_layer(copied_plan.targets[0], recipe, hessians, tokens, cpu, fuse_shared=fuse)
    (separate, separate_records), (fused, fused_records) = results[False], results[True]
    for name, weight in separate.items():
        assert (weight.codes == fused[name].codes).float().mean() > 0.999, name
        assert torch.allclose(weight.scale, fused[name].scale, rtol=1e-3, atol=1e-6), name
    for a, b in zip(separate_records, fused_records, strict=True):
        assert a.method == b.method != "gptq"
        assert abs(a.output_error - b.output_error) <= 1e-3 * a.output_error
