"""quantize -> save -> load in transformers (+ compressed-tensors) -> the same logits, for every family."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from conftest import FAMILIES, calibration_ids, tiny_model
from lowbit.export.writer import MANIFEST_NAME

SCHEMES = {
    "w4-sym-g32": {"weights.bits": 4, "weights.symmetric": True, "weights.group_size": 32},
    "w3-asym-g32": {"weights.bits": 3, "weights.symmetric": False, "weights.group_size": 32},
    "w2-asym-channel": {"weights.bits": 2, "weights.symmetric": False, "weights.group_size": -1},
    "w8-sym-g64": {"weights.bits": 8, "weights.symmetric": True, "weights.group_size": 64},
}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_checkpoint_loads_with_same_logits(family, tmp_path):
    model = tiny_model(family)
    ids = calibration_ids(vocab=model.config.vocab_size)
    recipe = lowbit.Recipe().updated(**SCHEMES["w4-sym-g32"])
    quantized = lowbit.quantize(model, recipe, ids, progress=False)
    with torch.no_grad():
        expected = quantized.model(ids).logits
    out = lowbit.save(quantized, tmp_path / "out")

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["report"]["counts"]["quantized"] > 0
    assert manifest["report"]["counts"]["uncalibrated"] == 0
    statuses = {r["name"]: r["status"] for r in manifest["report"]["linears"]}
    assert set(statuses) == {name for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    with torch.no_grad():
        assert relative_difference(expected, loaded(ids).logits) < 1e-5
    if family != "gpt2":
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["format"] == "pack-quantized"


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_scheme_round_trips_through_lowbit_load(scheme, method, tmp_path):
    model = tiny_model("llama")
    ids = calibration_ids()
    recipe = lowbit.Recipe(method=method).updated(**SCHEMES[scheme])
    quantized = lowbit.quantize(model, recipe, ids, progress=False)
    with torch.no_grad():
        expected = quantized.model(ids).logits
    out = lowbit.save(quantized, tmp_path / "out")
    loaded, _ = lowbit.load(out)
    with torch.no_grad():
        assert relative_difference(expected, loaded(ids).logits) < 1e-5


def test_packed_checkpoint_is_smaller_than_dense(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    recipe = lowbit.Recipe(method="rtn").updated(**SCHEMES["w4-sym-g32"])
    out = lowbit.save(lowbit.quantize(model, recipe, progress=False), tmp_path / "q")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    packed = (out / "model.safetensors").stat().st_size
    linear_params = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers") and hasattr(m, "weight") and m.weight.dim() == 2)
    assert dense - packed > 0.7 * linear_params * 4 * (1 - 4 / 32)  # roughly 28 of 32 bits saved per weight


def test_act_order_without_static_groups_is_refused_at_save(tmp_path):
    model = tiny_model("llama")
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "gptq.act_order": True, "gptq.static_groups": False})
    quantized = lowbit.quantize(model, recipe, calibration_ids(), progress=False)
    with pytest.raises(ValueError, match="static_groups"):
        lowbit.save(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.lowbit-tmp-*"))


def test_act_order_with_static_groups_round_trips(tmp_path):
    model = tiny_model("qwen2")
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "gptq.act_order": True, "gptq.static_groups": True})
    ids = calibration_ids()
    quantized = lowbit.quantize(model, recipe, ids, progress=False)
    with torch.no_grad():
        expected = quantized.model(ids).logits
    loaded, _ = lowbit.load(lowbit.save(quantized, tmp_path / "out"))
    with torch.no_grad():
        assert relative_difference(expected, loaded(ids).logits) < 1e-5


@pytest.mark.parametrize("scheme", ["w4-sym-g32", "w3-asym-g32"])
def test_prepared_packed_tensors_give_the_same_state_dict(scheme):
    """The streaming store packs finished linears where they are computed (a GPU) and hands the packed tensors to
    the writer; the state dict built from them equals the one packed by the writer itself."""
    from lowbit.export.compressed_tensors import build_state_dict, compressed_module_tensors

    model = tiny_model("llama")
    ids = calibration_ids(vocab=model.config.vocab_size)
    quantized = lowbit.quantize(model, lowbit.Recipe(method="rtn").updated(**SCHEMES[scheme]), ids, progress=False)
    weights = dict(list(quantized.weights.items())[:3])
    dtype = next(quantized.model.parameters()).dtype
    prepared = {name: compressed_module_tensors(weight, dtype) for name, weight in weights.items()}
    plain, plain_config, _ = build_state_dict(quantized.model, weights)
    packed, packed_config, _ = build_state_dict(quantized.model, weights, prepared=prepared)
    assert plain.keys() == packed.keys() and plain_config == packed_config
    assert all(torch.equal(plain[key], packed[key]) for key in plain)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_a_block_of_rows_at_a_time_equals_packing_at_once(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lowbit.export.compressed_tensors import _packed_codes
    from lowbit.formats.integer import QuantizedWeight

    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (100, 96), dtype=torch.uint8, generator=generator)
    weight = QuantizedWeight(codes, torch.rand(100, 3), torch.full((100, 3), 1.0), bits, False, 32)
    assert torch.equal(_packed_codes(weight, rows_per_step=7), pack_to_int32(weight.signed_codes(), bits))
