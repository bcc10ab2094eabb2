"""The quantized products without Triton (lowbit.kernels.cpu): torch's CPU int4 and int8 kernels, and the
dequantizing path, against the float64 reference; the modules' use of them; the real SmolLM2 on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import WIKI_TEST, requires_smollm2, requires_wikitext
from lowbit.kernels import cpu
from lowbit.kernels import linear as linear_mod
from lowbit.kernels.layout import pack_wna16, unpack_wna16
from lowbit.kernels.linear import Fp8Dynamic, Int8Dynamic, W8A8Linear, WeightOnly, WNA16Linear
from lowbit.kernels.reference import dequantize_weight, quantize_weight_groupwise, w8a8_matmul_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def packed_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    q, scale, zero = quantize_weight_groupwise(weight, bits, group_size, symmetric)
    return pack_wna16(q, scale.to(torch.bfloat16), zero, bits, group_size)


@pytest.fixture
def torch_fallback(monkeypatch) -> None:
    """The modules as on a machine without Triton (conftest sets TRITON_INTERPRET=1 for the kernel tests)."""
    monkeypatch.setattr(linear_mod, "kernels_available", lambda device: False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_packed_is_the_reference(bits: int, group_size: int, symmetric: bool) -> None:
    k = 200 if group_size == -1 else 512  # per-channel: K padded to the 128-wide K-blocks
    packed = packed_weight(48, k, bits, group_size, symmetric)
    expected = dequantize_weight(*unpack_wna16(packed), bits)
    assert torch.equal(cpu.dequantize_packed(packed), expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernel_matches_the_reference(bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> None:
    packed = packed_weight(96, 768, bits, group_size, symmetric)
    x = torch.randn(2, 3, 768, dtype=dtype)
    assert cpu.int4_cpu_refusal(packed, x) is None
    prepared = cpu.prepare_int4_cpu(packed, dtype)
    assert len(prepared.planes) == bits // 4
    out = cpu.int4_mm_cpu(x, prepared)
    ref = x.double() @ dequantize_weight(*unpack_wna16(packed), bits).double().T
    assert out.shape == (2, 3, 96) and out.dtype == dtype
    # bf16: the kernel rounds each dequantized weight to bf16 (measured 1.5-1.9e-3 at 4 bits); fp16 keeps 3 more bits
    assert rel_err(out, ref) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [64, 512, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernel_with_activations_that_do_not_average_to_zero(bits, group_size, symmetric, dtype) -> None:
    """ReLU-like inputs (OPT's fc2 sees them): a split of the 8-bit float zero into two large opposite plane outputs
    was 5-15x over tolerance here while zero-mean inputs hid it (review, session 28)."""
    packed = packed_weight(96, 1024, bits, group_size, symmetric, seed=1)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2)).relu().to(dtype)
    out = cpu.int4_mm_cpu(x, cpu.prepare_int4_cpu(packed, dtype))
    ref = x.double() @ dequantize_weight(*unpack_wna16(packed), bits).double().T
    assert rel_err(out, ref) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "dtype", "reason"),
    [
        (40, 256, 4, 128, torch.bfloat16, "not a multiple of 16"),
        (48, 256, 4, 128, torch.float32, "load the model in bfloat16"),
        (48, 200, 4, -1, torch.bfloat16, "group_size -1"),
    ],
)
def test_int4_kernel_refusals_say_why(n, k, bits, group_size, dtype, reason) -> None:
    packed = packed_weight(n, k, bits, group_size, True)
    refusal = cpu.int4_cpu_refusal(packed, torch.zeros(1, k, dtype=dtype))
    assert refusal is not None and reason in refusal
    if dtype != torch.float32:  # the weight itself does not fit the kernel
        with pytest.raises(ValueError, match="dequantizing path"):
            cpu.prepare_int4_cpu(packed, torch.bfloat16)


def test_module_runs_the_int4_kernel_and_rebuilds_it_when_the_weights_change(torch_fallback) -> None:
    torch.manual_seed(0)
    module = WNA16Linear(packed_weight(64, 256, 4, 64, False))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_weight(*unpack_wna16(module.packed), 4).double().T
    out = module(x)
    assert module._cpu_int4 is not None, "bf16 activations on the CPU take torch's int4 kernel"
    assert rel_err(out, ref) < 4e-3
    prepared = module._cpu_int4[1]
    module(x)
    assert module._cpu_int4[1] is prepared, "converted once, then kept"
    module.scale.mul_(2)  # an in-place change of a buffer (e.g. load_state_dict) makes a new conversion
    assert rel_err(module(x), 2 * ref) < 4e-3
    assert module._cpu_int4[1] is not prepared


def test_module_made_in_inference_mode_runs(torch_fallback) -> None:
    with torch.inference_mode():
        module = WNA16Linear(packed_weight(64, 256, 4, 64, True))
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        out = module(x)
    ref = x.double() @ dequantize_weight(*unpack_wna16(module.packed), 4).double().T
    assert module._cpu_int4 is not None and rel_err(out, ref) < 4e-3


def test_load_state_dict_and_to_drop_the_conversion(torch_fallback) -> None:
    """A compiled graph uses the conversion without checking it: load_state_dict and .to() must drop it."""
    first, second = (WNA16Linear(packed_weight(64, 256, 4, 64, False, seed=s)) for s in (0, 1))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    first(x)
    assert first._cpu_int4 is not None
    first.load_state_dict(second.state_dict())
    assert first._cpu_int4 is None
    assert torch.equal(first(x), second(x))
    first.to(torch.float16)
    assert first._cpu_int4 is None


def test_module_falls_back_to_dequantizing_and_says_so(torch_fallback, caplog, monkeypatch) -> None:
    monkeypatch.setattr(linear_mod, "_WARNED", set())
    module = WNA16Linear(packed_weight(64, 256, 8, 128, False))
    x = torch.randn(2, 256, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.linear"):
        out = module(x)
        module(x)
    assert module._cpu_int4 is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("W8A16 on the CPU dequantizes its weights on every call")
    assert "torch.float32 activations" in messages[0] and "load the model in bfloat16" in messages[0]
    ref = x @ dequantize_weight(*unpack_wna16(module.packed), 8).T
    assert torch.equal(out, ref)


def test_int8_w8a8_on_the_cpu_is_bitwise_the_reference(torch_fallback) -> None:
    torch.manual_seed(0)
    module = W8A8Linear.from_linear(nn.Linear(200, 72, bias=True), Int8Dynamic())
    x = torch.randn(2, 5, 200, dtype=torch.bfloat16)
    expected = w8a8_matmul_reference(x.reshape(10, 200), module.weight, module.weight_scale).reshape(2, 5, 72)
    assert torch.equal(module(x), expected + module.bias)


def test_fp8_w8a8_on_the_cpu_keeps_the_reference(torch_fallback) -> None:
    torch.manual_seed(0)
    module = W8A8Linear.from_linear(nn.Linear(64, 32, bias=False), Fp8Dynamic())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(module(x), w8a8_matmul_reference(x, module.weight, module.weight_scale))


def test_swap_linears_model_agrees_with_its_dequantized_twin(torch_fallback) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).to(torch.bfloat16)
    linear_mod.swap_linears(model, WeightOnly(4, 64, False))
    dense = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).double()
    for i in (0, 2):
        dense[i].weight.data = dequantize_weight(*unpack_wna16(model[i].packed), 4).double()
        dense[i].bias.data = model[i].bias.double()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert rel_err(model(x), dense(x.double())) < 1e-2


@pytest.mark.real_model
@pytest.mark.slow
@requires_smollm2
@requires_wikitext
def test_real_smollm2_w4_checkpoint_on_the_cpu_kernel(tmp_path, torch_fallback) -> None:
    """SmolLM2-135M quantized to W4 g64 (RTN), saved, loaded into kernel modules on the CPU: its perplexity through
    torch's int4 kernel (bf16) agrees with the same checkpoint dequantized in float32, and greedy generation runs."""
    import lowbit
    from lowbit.data.calibration import tokenize_text
    from lowbit.eval.perplexity import perplexity, token_windows
    from lowbit.kernels.checkpoint import load_quantized
    from lowbit.kernels.runtime import generate
    from lowbit.models.loading import load_model

    model, tokenizer, source = load_model("smollm2-135m")
    recipe = lowbit.Recipe(method="rtn").updated(
        **{"weights.bits": 4, "weights.group_size": 64, "weights.symmetric": False, "weights.clip": "minmax"}
    )
    quantized = lowbit.quantize(model, recipe, tokenizer=tokenizer, progress=False)
    quantized.source = source
    folder = lowbit.save(quantized, tmp_path / "w4")
    windows = token_windows(tokenize_text(tokenizer, WIKI_TEST.read_text()), 256, 3)

    kernel_model, _ = load_quantized(folder, device="cpu", dtype=torch.bfloat16)
    modules = [m for m in kernel_model.modules() if isinstance(m, WNA16Linear)]
    assert len(modules) == 30 * 7
    fast = perplexity(kernel_model, windows).perplexity
    assert all(m._cpu_int4 is not None for m in modules), "every projection ran torch's int4 kernel"
    dequantized, _ = lowbit.load(folder, device="cpu", dtype=torch.float32, kernels=False)
    exact = perplexity(dequantized, windows).perplexity
    assert fast == pytest.approx(exact, rel=0.02)

    text, result = generate(str(folder), "The capital of France is", 8, device="cpu", use_cuda_graph=False)
    assert result.tokens.shape == (1, 8) and text.strip()


@pytest.mark.slow
def test_compiled_cpu_decode_step_matches_eager(torch_fallback, caplog) -> None:
    """torch.compile of a decode step whose W4 projections run torch's int4 kernel: the conversion made by the eager
    prefill is used inside the graph (no graph break per projection), and the tokens are the eager ones."""
    from lowbit.kernels.runtime import DecoderShape, greedy_decode, linear_factory, random_decoder

    shape = DecoderShape(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32)  # fmt: skip
    torch.manual_seed(0)
    model = random_decoder(shape, linear_factory("w4a16", "cpu"), device="cpu").fuse_projections()
    prompt = torch.randint(0, shape.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = greedy_decode(model, prompt, new_tokens=4, use_cuda_graph=False)
    modules = [m for m in model.modules() if isinstance(m, WNA16Linear)]
    assert modules and all(m._cpu_int4 is not None for m in modules)
    with caplog.at_level("WARNING"):
        compiled = greedy_decode(model, prompt, new_tokens=4, use_cuda_graph=False, compile_step=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # greedy_decode reset dynamo before compiling
    assert "decoding eagerly" not in caplog.text and compiled.compiled
    assert graphs == 1, f"the decode step compiled into {graphs} graphs: something breaks it"
    assert torch.equal(compiled.tokens, eager.tokens)
