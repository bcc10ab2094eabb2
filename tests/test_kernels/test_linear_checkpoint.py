"""QuantizedLinear modules, swap_linears, and loading compressed-tensors checkpoints into them."""

from __future__ import annotations

import json
from pathlib import Path

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, these tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.kernels import linear as linear_mod  # noqa: E402
from lowbit.kernels.checkpoint import load_quantized, quantized_modules  # noqa: E402
from lowbit.kernels.linear import (  # noqa: E402
    Fp8Dynamic,
    Int8Dynamic,
    W8A8Linear,
    WeightOnly,
    WNA16Linear,
    swap_linears,
)
from lowbit.kernels.reference import dequantize_weight, quantize_weight_groupwise  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(params=[True, False], ids=["triton-interpreter", "torch-fallback"])
def kernels_on(request, monkeypatch) -> bool:
    if not request.param:
        monkeypatch.setattr(linear_mod, "kernels_available", lambda device: False)
    else:
        pytest.importorskip("triton")
    return request.param


@pytest.mark.parametrize(
    "scheme", [WeightOnly(4, 32, True), WeightOnly(8, -1, False), Int8Dynamic(), Fp8Dynamic()], ids=str
)
def test_swap_linears_forward(scheme, kernels_on: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False)).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ref = model(x)
    swap_linears(model, scheme)
    expected = WNA16Linear if isinstance(scheme, WeightOnly) else W8A8Linear
    assert all(isinstance(model[i], expected) for i in (0, 2))
    out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < (0.25 if scheme == WeightOnly(4, 32, True) else 0.05)


def test_swap_linears_refuses_bad_group_size() -> None:
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(ValueError, match="does not divide in_features 48"):
        swap_linears(model, WeightOnly(4, 32))
    swap_linears(model, WeightOnly(4, 32), skip=lambda name, lin: lin.in_features == 48)
    assert isinstance(model[0], nn.Linear)


def compressed_tensors_entries(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, g_idx=None):
    """What a compressed-tensors pack-quantized checkpoint holds for one Linear, built with its own packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q, scale, zero = quantize_weight_groupwise(weight, bits, group_size, symmetric)
    offset = 2 ** (bits - 1)
    entries = {
        "weight_packed": pack_to_int32((q - offset).to(torch.int8), bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if zero is not None:
        # compressed-tensors 0.19 packs along dim 0 through a transpose (0.20 copies); safetensors saves contiguous
        # tensors only, so contiguous here, as lowbit's exporter does
        entries["weight_zero_point"] = pack_to_int32(
            (zero - offset).to(torch.int8), bits, packed_dim=0
        ).contiguous()
    return entries, dequantize_weight(q, scale, zero, bits)


def quant_config(bits: int, group_size: int, symmetric: bool) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "channel" if group_size == -1 else "group",
                    "group_size": None if group_size == -1 else group_size,
                },
            }
        },
        "ignore": ["lm_head"],
    }


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 64, False), (8, -1, True)])
def test_quantized_modules_from_compressed_tensors(
    bits: int, group_size: int, symmetric: bool, kernels_on
) -> None:
    torch.manual_seed(1)
    weight = torch.randn(40, 128)
    entries, dequant = compressed_tensors_entries(weight, bits, group_size, symmetric)
    tensors = {f"layer.proj.{k}": v for k, v in entries.items()}
    tensors["layer.proj.bias"] = torch.randn(40)
    modules = quantized_modules(tensors, quant_config(bits, group_size, symmetric), torch.float32)
    module = modules["layer.proj"]
    assert isinstance(module, WNA16Linear) and module.group_size == group_size
    x = torch.randn(3, 128)
    ref = x.double() @ dequant.double().T + tensors["layer.proj.bias"].double()
    assert rel_err(module(x), ref) < 1e-4


def test_act_order_g_idx_is_permuted(kernels_on) -> None:
    """A g_idx whose groups are not contiguous: columns are sorted by group and x permuted to match."""
    torch.manual_seed(2)
    n, k, g = 16, 128, 32
    perm = torch.randperm(k)
    g_idx = (torch.arange(k) // g)[torch.argsort(perm)]  # column c belongs to group g_idx[c]
    q = torch.randint(0, 16, (n, k), dtype=torch.int16)
    scale = torch.rand(n, k // g) + 0.1
    weight = (q.float() - 8) * scale[:, g_idx]
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    tensors = {
        "p.weight_packed": pack_to_int32((q - 8).to(torch.int8), 4),
        "p.weight_scale": scale,
        "p.weight_shape": torch.tensor([n, k]),
        "p.weight_g_idx": g_idx.to(torch.int32),
    }
    module = quantized_modules(tensors, quant_config(4, g, True), torch.float32)["p"]
    assert module.input_permutation is not None
    x = torch.randn(2, k)
    assert rel_err(module(x), x.double() @ weight.double().T) < 1e-5


def test_load_quantized_tiny_llama(tmp_path: Path, kernels_on) -> None:
    """End to end: a tiny Llama saved as pack-quantized safetensors loads into kernel modules."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix = name[: -len(".weight")]
        module = model.get_submodule(prefix) if name.endswith(".weight") else None
        if isinstance(module, nn.Linear) and prefix != "lm_head":
            entries, dequant = compressed_tensors_entries(tensor, 4, 32, False)
            tensors.update({f"{prefix}.{k}": v for k, v in entries.items()})
            module.weight.data = dequant  # the reference model computes with the dequantized weights
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quant_config(4, 32, False)
    (tmp_path / "config.json").write_text(json.dumps(config_dict))

    loaded, tokenizer = load_quantized(tmp_path, device="cpu", dtype=torch.float32)
    assert tokenizer is None
    assert sum(isinstance(m, WNA16Linear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out, ref = loaded(ids).logits, model(ids).logits
    assert rel_err(out, ref) < 1e-4
