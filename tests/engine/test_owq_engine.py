"""OWQ wired into the engine: at ~W3 plus ~1.6% of the columns in 16 bits it lowers the layer-wise output error of
plain W3 GPTQ; the checkpoint keeps the columns as extra tensors that ``lowbit.load`` puts back (same logits as in
memory), that plain transformers ignores, and that the size accounting counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from tests.conftest import calibration_ids, make_model_folder, tiny_model, with_outlier_channels, word_text
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
from typer.testing import CliRunner

import lowbit
from lowbit.algorithms.owq import bits_account, kept_column_count
from lowbit.eval.size import checkpoint_size
from lowbit.formats.owq import OWQWeight
from lowbit.recipe import Recipe

W3 = {"weights.bits": 3, "weights.group_size": 32, "weights.symmetric": False, "calibration.batch_size": 4}
BUDGET = 0.3  # bits per weight: one 16-bit column of 64 inputs (1.6%), two of 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _outlier_model() -> torch.nn.Module:
    """A few large residual channels, as in real LLMs: their input columns are the weak ones."""
    return with_outlier_channels(tiny_model("llama"), 20.0)


@pytest.fixture(scope="module")
def runs():
    model, ids = _outlier_model(), calibration_ids(8, 32)
    plain = lowbit.quantize(copy.deepcopy(model), Recipe().updated(**W3), ids, progress=False)
    owq = lowbit.quantize(copy.deepcopy(model), Recipe().updated(**W3, **{"owq.outlier_budget_bits": BUDGET}), ids,
                          progress=False)
    return model, ids, plain, owq


def _quantized(report) -> list:
    return [r for r in report.linears if r.status == "quantized"]


def test_owq_lowers_the_output_error_of_w3_gptq(runs) -> None:
    model, ids, plain, owq = runs
    records = _quantized(owq.report)
    assert all(r.method == "gptq+owq" for r in records)
    for r in records:  # its own share, floor(0.3 * out * in / (16 * out + 32)), plus at most one carried column
        own = kept_column_count(r.out_features, r.in_features, BUDGET)
        assert own >= 1 and own <= r.kept_columns <= own + 1
    plain_error = sum(r.output_error for r in _quantized(plain.report))
    owq_error = sum(r.output_error for r in records)
    assert owq_error < 0.8 * plain_error
    with torch.no_grad():
        reference = model(ids).logits

        def logit_error(m):
            return float((m(ids).logits - reference).pow(2).mean() / reference.pow(2).mean())

        assert logit_error(owq.model) < logit_error(plain.model)
    # the in-memory weights are the low-bit matrix with the kept columns restored (as stored, in float16)
    name = records[0].name
    weight = owq.weights[name]
    assert isinstance(weight, OWQWeight) and weight.kept_columns.dtype == torch.float16
    dense = owq.model.get_submodule(name).weight
    assert torch.equal(dense[:, weight.kept_indices], weight.kept_columns.float())
    others = torch.ones(dense.shape[1], dtype=torch.bool)
    others[weight.kept_indices] = False
    assert torch.equal(dense[:, others], weight.dequantize()[:, others])


def test_checkpoint_round_trip_and_size(runs, tmp_path) -> None:
    _, ids, _, owq = runs
    with torch.no_grad():
        expected = owq.model(ids).logits
    out = lowbit.save(owq, tmp_path / "owq")
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["owq"]["format"] == "lowbit-owq/1" and manifest["format"] == "compressed-tensors/pack-quantized"
    loaded, _ = lowbit.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        # plain transformers ignores the extra tensors: it runs, on the low-bit matrix alone (kept columns at 0)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        assert not torch.allclose(plain(ids).logits, expected)
    name = _quantized(owq.report)[0].name
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as handle:
        assert handle.get_tensor(f"{name}.owq_kept_index").dtype == torch.int32
        assert tuple(handle.get_tensor(f"{name}.owq_kept_weight").shape) == tuple(owq.weights[name].kept_columns.shape)

    size = checkpoint_size(out)
    records = _quantized(owq.report)
    weights = sum(r.in_features * r.out_features for r in records)
    kept_bits = sum(bits_account(r.out_features, r.in_features, owq.recipe.weights, r.kept_columns).kept_bits
                    for r in records)
    parts = size["bits_per_weight_parts"]
    assert parts["owq_kept_weight"] + parts["owq_kept_index"] == pytest.approx(kept_bits / weights)
    assert size["bits_per_weight"] > 3 + kept_bits / weights


def test_cli_streams_owq_and_lowbit_load_matches_memory(tmp_path, tokenizer_folder) -> None:
    from lowbit.cli import app

    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text = word_text(tmp_path / "text.txt", 3000)
    out = tmp_path / "q"
    result = CliRunner().invoke(app, [
        "quantize", str(folder), "--bits", "3", "--group-size", "32", "--asymmetric", "--outlier-budget", str(BUDGET),
        "--calibration", str(text), "--num-samples", "4", "--seqlen", "32", "--device", "cpu", "--quiet",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["recipe"]["owq"]["outlier_budget_bits"] == BUDGET and manifest["owq"]["format"] == "lowbit-owq/1"
    assert all(r["kept_columns"] > 0 for r in manifest["report"]["linears"] if r["status"] == "quantized")
    loaded, _ = lowbit.load(out)
    recipe = Recipe().updated(**{"weights.bits": 3, "weights.group_size": 32, "weights.symmetric": False,
                                 "owq.outlier_budget_bits": BUDGET, "calibration.source": str(text),
                                 "calibration.num_samples": 4, "calibration.seqlen": 32})
    memory = lowbit.quantize(str(folder), recipe, progress=False)  # the same job, in memory
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        expected = memory.model(ids).logits
        assert float((loaded(ids).logits - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("changes", [{"method": "rtn"}, {"gptq.grid": "two_stage"}, {"blockwise.iterations": 5}])
def test_owq_refuses_combinations_it_cannot_honour(changes) -> None:
    with pytest.raises(ValidationError, match="owq keeps columns in 16 bits"):
        Recipe().updated(**{"owq.outlier_budget_bits": 0.01, **changes})


def test_a_budget_too_small_for_any_one_linear_is_carried_over_the_model() -> None:
    """0.02 bits per weight buys no 16-bit column of any tiny linear alone (one costs >= 0.25 bits per weight of a
    64-wide layer); shared over the model in order, some linears keep one and the total stays within the budget."""
    model, ids = _outlier_model(), calibration_ids(4, 16)
    budget = 0.02
    owq = lowbit.quantize(model, Recipe().updated(**W3, **{"owq.outlier_budget_bits": budget}), ids, progress=False)
    records = _quantized(owq.report)
    assert all(bits_account(r.out_features, r.in_features, owq.recipe.weights, 1).kept_bits
               > budget * r.out_features * r.in_features for r in records)
    weights = sum(r.in_features * r.out_features for r in records)
    kept_bits = sum(bits_account(r.out_features, r.in_features, owq.recipe.weights, r.kept_columns).kept_bits
                    for r in records)
    assert sum(r.kept_columns for r in records) >= 1
    assert kept_bits <= budget * weights
