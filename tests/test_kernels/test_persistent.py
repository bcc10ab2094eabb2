"""The persistent launch of a decoder layer's second half (lowbit.kernels.persistent): its arithmetic on the CPU
(phase by phase in Triton's interpreter), its grid barriers on a GPU."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, these tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.kernels import persistent  # noqa: E402
from lowbit.kernels.layout import unpack_wna16  # noqa: E402
from lowbit.kernels.linear import WeightOnly, WNA16Linear, concat_outputs  # noqa: E402
from lowbit.kernels.reference import dequantize_weight  # noqa: E402
from lowbit.kernels.runtime import DecoderShape, greedy_decode, linear_factory, random_decoder  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TINY = DecoderShape(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=32)  # fmt: skip


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """Default launches (W4A16 and this kernel): a GPU run would otherwise compile and time every candidate per shape."""
    from lowbit.kernels import w4a16

    monkeypatch.setattr(w4a16, "_AUTOTUNE", [False])


def mlp_modules(h: int, inter: int, scheme: WeightOnly, dtype: torch.dtype, seed: int = 0):
    """o, fused gate/up and down as 4-bit modules, with weights whose products keep activations near unit size."""
    torch.manual_seed(seed)

    def make(k: int, n: int) -> WNA16Linear:
        linear = torch.nn.Linear(k, n, bias=False)
        torch.nn.init.normal_(linear.weight, std=k**-0.5)
        module = WNA16Linear.from_linear(linear.to(dtype), scheme)
        return module.to(DEVICE)

    o, gate, up, down = make(h, h), make(h, inter), make(h, inter), make(inter, h)
    return o, concat_outputs([gate, up]), down


def float64_mlp(attn, x, o, gate_up, down, norm, eps):
    """The same step in float64 from the dequantized weights (no intermediate rounding)."""

    def weight(m):
        q, scale, zero = unpack_wna16(m.packed)
        return dequantize_weight(q, scale.double(), None if zero is None else zero.double(), 4).double()

    h = x.double() + attn.double() @ weight(o).T
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    gate, up = (normed @ weight(gate_up).T).chunk(2, dim=-1)
    return h + (F.silu(gate) * up) @ weight(down).T


def unfused_mlp(attn, x, o, gate_up, down, norm, eps):
    """The decode step's separate operations (runtime.Block with PERSISTENT off)."""
    h = x + o(attn)
    gate, up = gate_up(F.rms_norm(h, (h.shape[-1],), norm, eps)).chunk(2, dim=-1)
    return h + down(F.silu(gate) * up)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SCHEMES = [WeightOnly(4, 128, True), WeightOnly(4, 128, False), WeightOnly(4, -1, True), WeightOnly(4, 256, False)]


@pytest.mark.parametrize(
    ("scheme", "dtype"),
    [(s, torch.bfloat16) for s in SCHEMES] + [(SCHEMES[1], torch.float16)],
    ids=["g128", "g128-asym", "per-channel", "g256-asym", "g128-asym-fp16"],
)
def test_matches_the_unfused_step(scheme: WeightOnly, dtype: torch.dtype) -> None:
    """Against float64 math and the separate operations, within the roundings of 16-bit activations (the CPU
    interpreter of Triton 3.9 truncates float32 -> bf16 casts, where CUDA rounds to nearest: a looser bound here)."""
    h, inter, eps = (256, 256, 1e-5) if scheme.group_size == 256 else (128, 256, 1e-5)
    o, gate_up, down = mlp_modules(h, inter, scheme, dtype)
    gen = torch.Generator().manual_seed(1)
    attn = torch.randn(1, 1, h, generator=gen).to(DEVICE, dtype)
    x = torch.randn(1, 1, h, generator=gen).to(DEVICE, dtype)
    norm = (torch.rand(h, generator=gen) + 0.5).to(DEVICE, dtype)
    got = persistent.mlp_block(attn, x, o, gate_up, down, norm, eps)
    assert got.shape == x.shape and got.dtype == dtype
    exact = float64_mlp(attn, x, o, gate_up, down, norm, eps)
    unfused = unfused_mlp(attn, x, o, gate_up, down, norm, eps)
    bound = 5e-3 if GPU else 1.5e-2
    assert rel(got, exact) < bound
    assert rel(got, unfused) < bound
    assert rel(unfused, exact) < bound  # the comparison is meaningful: both are near the exact value
    wrong = persistent.mlp_block(attn, x, o, gate_up, down, norm * 2, eps)  # a changed norm weight changes it
    assert rel(wrong, exact) > 5 * bound


@pytest.mark.parametrize(
    "config",
    [persistent.MLPBlockConfig(norm_split=False), persistent.MLPBlockConfig(split_o=2, split_d=4)],
    ids=["norm-in-gate-up-tiles", "split-k"],
)
def test_launch_options_agree(config) -> None:
    """The norm inside every gate/up tile (``norm_split=False``) and the o and down phases split over K-slices (the
    last slice of a tile sums the partials) agree with the default launch and with float64 math."""
    h, inter, eps = 128, 512, 1e-5
    o, gate_up, down = mlp_modules(h, inter, WeightOnly(4, 128, True), torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    attn, x = (torch.randn(1, 1, h, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    norm = (torch.rand(h, generator=gen) + 0.5).to(DEVICE, torch.bfloat16)
    default = persistent.mlp_block(attn, x, o, gate_up, down, norm, eps, persistent.MLPBlockConfig())
    got = persistent.mlp_block(attn, x, o, gate_up, down, norm, eps, config)
    exact = float64_mlp(attn, x, o, gate_up, down, norm, eps)
    bound = 5e-3 if GPU else 1.5e-2
    assert rel(got, exact) < bound and rel(default, exact) < bound
    assert rel(got, default) < bound


def test_only_where_it_applies(monkeypatch) -> None:
    o, gate_up, down = mlp_modules(128, 256, WeightOnly(4, 128, True), torch.bfloat16)
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16, device=DEVICE)
    norm = torch.ones(128, dtype=torch.bfloat16, device=DEVICE)
    assert persistent.PERSISTENT == ["off"]  # until measured to pay (bench/notes/kernels.md)
    assert not persistent.mlp_block_ok(x, o, gate_up, down, norm)
    monkeypatch.setattr(persistent, "PERSISTENT", ["on"])
    assert persistent.mlp_block_ok(x, o, gate_up, down, norm)
    assert not persistent.mlp_block_ok(x.expand(1, 2, 128), o, gate_up, down, norm)  # two tokens
    assert not persistent.mlp_block_ok(x.float(), o, gate_up, down, norm)
    assert not persistent.mlp_block_ok(x, o, None, down, norm)  # gate and up not fused
    g64 = mlp_modules(128, 256, WeightOnly(4, 64, True), torch.bfloat16)
    assert not persistent.mlp_block_ok(x, *g64, norm)  # groups under a K-block
    w8 = mlp_modules(128, 256, WeightOnly(8, 128, True), torch.bfloat16)
    assert not persistent.mlp_block_ok(x, *w8, norm)
    mixed = mlp_modules(128, 256, WeightOnly(4, 128, False), torch.bfloat16)
    assert not persistent.mlp_block_ok(x, o, mixed[1], down, norm)  # symmetric and asymmetric together


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_decoder_gives_the_tokens_of_the_unfused_step(compile_step: bool, monkeypatch) -> None:
    """Greedy decoding with the persistent launch gives the separate operations' tokens, and the op really runs."""
    model = random_decoder(TINY, linear_factory("w4a16", DEVICE), device=DEVICE).fuse_projections()
    prompt = torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    plain = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False)
    monkeypatch.setattr(persistent, "PERSISTENT", ["on"])
    calls = []
    real = persistent.mlp_block

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(persistent, "mlp_block", spy)
    got = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False, compile_step=compile_step)
    assert calls
    assert torch.equal(got.tokens, plain.tokens)


gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: grid barriers (the interpreter runs the phases apart)")


@gpu
@pytest.mark.parametrize("config", [persistent.MLPBlockConfig(), persistent.MLPBlockConfig(8, 1, 16, 16, 8, 16, 16, 16),
                                    persistent.MLPBlockConfig(4, 5, 16, 8, 8, 8, 16, 8, 2, 4, norm_split=False)])  # fmt: skip
def test_gpu_barriers_give_the_phased_result_bitwise(config) -> None:  # pragma: no cover
    """One launch with grid barriers equals three separate launches bitwise, in a CUDA graph of 12 chained launches
    (Llama-3-8B's sizes: the counters must reset themselves between launches)."""
    h, inter, eps = 4096, 14336, 1e-5
    o, gate_up, down = mlp_modules(h, inter, WeightOnly(4, 128, True), torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    attn = torch.randn(1, 1, h, generator=gen).to(DEVICE, torch.bfloat16)
    x0 = torch.randn(1, 1, h, generator=gen).to(DEVICE, torch.bfloat16)
    norm = (torch.rand(h, generator=gen) + 0.5).to(DEVICE, torch.bfloat16)

    def chain(phased: bool) -> torch.Tensor:
        x = x0
        phases = persistent.all_phases(config) if phased else None
        for _ in range(12):
            x = persistent.mlp_block(attn, x, o, gate_up, down, norm, eps, config, phases=phases)
            x = x / x.float().norm().to(x.dtype) * h**0.5  # keep the chained activations at unit size
        return x

    from tests.test_kernels.gpu_chains import graph_replay

    assert torch.equal(graph_replay(lambda: chain(True)), graph_replay(lambda: chain(False)))
    single = persistent.mlp_block(attn, x0, o, gate_up, down, norm, eps, config)
    assert rel(single, float64_mlp(attn, x0, o, gate_up, down, norm, eps)) < 5e-3


@gpu
def test_gpu_grid_fits_the_device() -> None:  # pragma: no cover
    """The grid never exceeds what the compiled kernel lets the GPU hold at once (the barriers depend on it)."""
    o, gate_up, down = mlp_modules(512, 1024, WeightOnly(4, 128, True), torch.bfloat16)
    x = torch.randn(1, 1, 512, dtype=torch.bfloat16, device=DEVICE)
    norm = torch.ones(512, dtype=torch.bfloat16, device=DEVICE)
    cfg = persistent.MLPBlockConfig(per_sm=32)
    persistent.mlp_block(x, x, o, gate_up, down, norm, 1e-5, cfg)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = [g for key, g in persistent._GRIDS.items() if key[0] == cfg]
    assert grids and all(sms <= g < sms * 32 for g in grids)
