"""Static-KV-cache greedy decoding: agrees with transformers and runs every scheme on the CPU."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, the tests marked INTERPRETER_ONLY (CPU tensors) skip and the test_gpu_* tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402
from tests.test_kernels.gpu_chains import chain_configs, chain_weights, graph_replay, small_w4_decoder  # noqa: E402
from tests.test_kernels.markers import INTERPRETER_ONLY  # noqa: E402

from lowbit.kernels import linear as linear_mod  # noqa: E402
from lowbit.kernels.runtime import (  # noqa: E402
    DecoderShape,
    decoder_from_hf,
    greedy_decode,
    linear_factory,
    random_decoder,
)

TINY = DecoderShape(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
)


@pytest.mark.parametrize("attention", ["matmul", "sdpa", "reduce", "auto", "triton"])
def test_matches_transformers_greedy(attention: str, monkeypatch) -> None:
    from lowbit.kernels import runtime

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(runtime, "ATTENTION", [attention])
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = model.generate(
            prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt)
        )
    decoder = decoder_from_hf(model, max_seq_len=32)
    result = greedy_decode(decoder, prompt, new_tokens=6, use_cuda_graph=False)
    assert torch.equal(result.tokens, expected[:, 7:])
    fused = greedy_decode(decoder.fuse_projections(), prompt, new_tokens=6, use_cuda_graph=False)
    assert decoder.blocks[0].qkv is not None and torch.equal(fused.tokens, expected[:, 7:])
    assert result.timed_steps == 5 and result.tokens_per_second > 0


@pytest.mark.parametrize("scheme", ["bf16", "w4a16", "w8a16", "int8", "fp8"])
def test_random_decoder_every_scheme(scheme: str, monkeypatch) -> None:
    # The PyTorch fallback keeps this fast; the kernels themselves are tested in test_w4a16 / test_w8a8.
    monkeypatch.setattr(linear_mod, "kernels_available", lambda device: False)
    model = random_decoder(TINY, linear_factory(scheme, "cpu"), device="cpu")
    prompt = torch.randint(0, TINY.vocab_size, (3, 5))
    result = greedy_decode(model, prompt, new_tokens=4, use_cuda_graph=False)
    assert result.tokens.shape == (3, 4)
    fused = greedy_decode(model.fuse_projections(), prompt, new_tokens=4, use_cuda_graph=False)
    assert model.blocks[0].gate_up is not None
    assert torch.equal(fused.tokens, result.tokens)
    assert int(result.tokens.max()) < TINY.vocab_size


def test_unknown_scheme_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'w3'"):
        linear_factory("w3", "cpu")


def test_decode_table() -> None:
    from lowbit.kernels.runtime import decode_table

    rows = [
        {"scheme": "bf16", "batch": 1, "tokens_per_s": 100.0},
        {"scheme": "w4a16", "batch": 1, "tokens_per_s": 150.0},
    ]
    assert "| w4a16 | 1 | 150.0 | 1.50x |" in decode_table(rows)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["auto", "triton"])
def test_compiled_decode_step_matches_eager(attention: str, caplog, monkeypatch) -> None:
    """torch.compile of the decode step, with the W4A16 kernel (and the decode-attention kernel) as opaque custom
    ops (interpreter on the CPU); the attention op reads the caches the same step has just written."""
    from lowbit.kernels import runtime

    monkeypatch.setattr(runtime, "ATTENTION", [attention])
    model = random_decoder(TINY, linear_factory("w4a16", "cpu"), device="cpu").fuse_projections()
    prompt = torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False)
    with caplog.at_level("WARNING", logger="lowbit.kernels.runtime"):
        compiled = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False, compile_step=True)
    assert "decoding eagerly" not in caplog.text and compiled.compiled and not eager.compiled  # it really compiled
    assert torch.equal(compiled.tokens, eager.tokens)


@INTERPRETER_ONLY
def test_custom_ops_match_the_modules() -> None:
    """The kernels' custom ops (what torch.compile sees) compute what the modules compute."""
    layer = linear_factory("w4a16", "cpu")(128, 48)
    x = torch.randn(2, 128).to(torch.bfloat16)
    torch.library.opcheck(
        torch.ops.lowbit.wna16_mm,
        (x, layer.qweight, layer.scale, layer.zero, layer.bits, layer.group_size, 128, 48),
        test_utils=("test_schema", "test_faketensor"),
    )
    assert torch.equal(
        layer(x), torch.ops.lowbit.wna16_mm(x, layer.qweight, layer.scale, None, 4, 128, 128, 48)
    )


def test_bench_decode_with_a_quantized_lm_head(monkeypatch) -> None:
    from lowbit.kernels.linear import WNA16Linear
    from lowbit.kernels.runtime import bench_decode

    monkeypatch.setattr(linear_mod, "kernels_available", lambda device: False)
    built = []
    real = random_decoder

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("lowbit.kernels.runtime.random_decoder", spy)
    rows = bench_decode("w4a16", (2,), prompt_len=4, new_tokens=3, shape=TINY, device="cpu", quantize_lm_head=True)
    assert [r["scheme"] for r in rows] == ["w4a16+lm_head"] and rows[0]["tokens_per_s"] > 0
    assert isinstance(built[0].lm_head, WNA16Linear)
    plain = bench_decode("bf16", (2,), prompt_len=4, new_tokens=3, shape=TINY, device="cpu", quantize_lm_head=True)
    assert plain[0]["scheme"] == "bf16" and isinstance(built[1].lm_head, torch.nn.Linear)


@pytest.mark.parametrize("mode", ["sdpa", "reduce"])
@pytest.mark.parametrize("t", [1, 5])
def test_attention_modes_match_the_matmul_path(mode: str, t: int, monkeypatch) -> None:
    from lowbit.kernels import runtime

    torch.manual_seed(0)
    b, kv, group, d, length = 2, 2, 3, 16, 9
    q = torch.randn(b, kv * group, t, d)
    k_cache, v_cache = torch.randn(b, kv, length, d), torch.randn(b, kv, length, d)
    pos = torch.arange(4, 4 + t)
    mask = torch.arange(length)[None, :] <= pos[:, None]
    monkeypatch.setattr(runtime, "ATTENTION", ["matmul"])
    expected = runtime.gqa_attention(q, k_cache, v_cache, mask)
    monkeypatch.setattr(runtime, "ATTENTION", [mode])
    got = runtime.gqa_attention(q, k_cache, v_cache, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a reference written out head by head: query head i reads key/value head i // group
    keys = k_cache.repeat_interleave(group, dim=1)
    values = v_cache.repeat_interleave(group, dim=1)
    scores = (q @ keys.transpose(-1, -2)) / d**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(got, probs @ values, atol=1e-5, rtol=1e-5)


@INTERPRETER_ONLY
@pytest.mark.parametrize(("compile_step", "fuse_lm_head"), [(False, False), (True, False), (False, True)])
def test_fused_decode_layers_give_the_unfused_tokens(compile_step: bool, fuse_lm_head: bool, monkeypatch) -> None:
    """With the norms, SwiGLU and residual adds inside the GEMV launches (``FUSE``), greedy decoding gives the same
    tokens as the separate operations, eagerly and compiled, and the fused op really runs; the final norm goes inside
    the lm_head's launch only with ``FUSE_LM_HEAD``."""
    from lowbit.kernels import runtime

    model = random_decoder(TINY, linear_factory("w4a16", "cpu"), device="cpu").fuse_projections()
    model.lm_head = linear_factory("w4a16", "cpu")(TINY.hidden_size, TINY.vocab_size)
    prompt = torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(runtime, "FUSE", ["off"])
    plain = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False)
    monkeypatch.setattr(runtime, "FUSE", ["on"])
    monkeypatch.setattr(runtime, "FUSE_LM_HEAD", [fuse_lm_head])
    calls = []
    real = linear_mod.WNA16Linear.fused

    def spy(self, *args, **kwargs):
        calls.append(self is model.lm_head)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(linear_mod.WNA16Linear, "fused", spy)
    fused = greedy_decode(model, prompt, new_tokens=3, use_cuda_graph=False, compile_step=compile_step)
    assert calls  # 4 per layer (+ the lm_head) per step (traced once when compiled)
    assert any(calls) == fuse_lm_head
    assert torch.equal(fused.tokens, plain.tokens)


def test_pdl_adds_no_launch_options_where_it_cannot_run(monkeypatch) -> None:
    """Programmatic dependent launch is Hopper-only: off by default, and on the CPU no launch changes even when on."""
    from lowbit.kernels import pdl

    assert pdl.PDL == ["off"]
    monkeypatch.setattr(pdl, "PDL", ["early"])
    assert not pdl.supported(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu"), 8) == {}
    monkeypatch.setattr(pdl, "PDL", ["attention"])
    assert pdl.launch_options(torch.device("cpu"), attention=True) == {}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper GPU (programmatic dependent launch)",
)
@pytest.mark.parametrize("fuse", ["off", "auto"])
@pytest.mark.parametrize("mode, prefetch_blocks", [("early", 0), ("early", 128), ("late", 2), ("attention", 0)])
def test_gpu_pdl_decode_gives_the_same_tokens(fuse: str, mode: str, prefetch_blocks: int, monkeypatch) -> None:  # pragma: no cover
    """Every lowbit launch of a CUDA-graph decode step overlapping its predecessor (PDL) gives the tokens of the
    serialized step: nothing reads an activation or writes before its wait."""
    from lowbit.kernels import pdl, runtime

    assert pdl.supported(torch.device("cuda"))
    model, prompt = small_w4_decoder()
    monkeypatch.setattr(runtime, "FUSE", [fuse])
    plain = greedy_decode(model, prompt, new_tokens=12)
    monkeypatch.setattr(pdl, "PDL", [mode])
    monkeypatch.setattr(pdl, "PREFETCH_BLOCKS", [prefetch_blocks])
    assert pdl.launch_options(torch.device("cuda"), 4, attention=True)["launch_pdl"]
    overlapped = greedy_decode(model, prompt, new_tokens=12)
    assert torch.equal(overlapped.tokens, plain.tokens)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper GPU (programmatic dependent launch)",
)
@pytest.mark.parametrize("mode, prefetch_blocks", [("early", 0), ("early", 128), ("late", 2)])
def test_gpu_pdl_chained_launches_are_bitwise_unchanged(mode: str, prefetch_blocks: int, monkeypatch) -> None:  # pragma: no cover
    """A CUDA graph of dependent W4A16 launches, each one's output the next one's input, through every PDL-aware
    kernel (raw-code tensor cores, multi-block GEMV and one-block GEMV, with and without split-K, whose workspace
    and counters are shared), gives bit-identical outputs when every launch overlaps its predecessor."""
    from lowbit.kernels import pdl
    from lowbit.kernels.w4a16 import wna16_matmul

    packed = chain_weights(2048, 1)[0]
    configs = chain_configs() * 3
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        y = x
        for cfg in configs:
            y = wna16_matmul(y, packed, cfg)
        return y

    serial = graph_replay(chain)
    assert torch.isfinite(serial).all() and serial.abs().max() > 0
    monkeypatch.setattr(pdl, "PDL", [mode])
    monkeypatch.setattr(pdl, "PREFETCH_BLOCKS", [prefetch_blocks])
    assert pdl.launch_options(x.device, 16)["PDL"] == pdl.MODES[mode]
    for _ in range(3):
        assert torch.equal(graph_replay(chain), serial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_last_is_the_first_maximal_index(dtype) -> None:
    """The two-reduction greedy choice equals ``argmax(-1, keepdim=True)``, ties (first index) and a vocabulary that
    is not a multiple of the chunk included, for 2-D and 3-D logits."""
    from lowbit.kernels.runtime import argmax_last

    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 128256), (2, 1, 5000), (2, 100)):
        for logits in (torch.randn(shape, generator=gen), torch.randint(0, 3, shape, generator=gen).float()):
            logits = logits.to(dtype)
            assert torch.equal(argmax_last(logits), logits.argmax(-1, keepdim=True)), shape
    ties = torch.zeros(1, 9000, dtype=dtype)
    ties[0, [4100, 8000]] = 1.0  # the same maximum in two chunks: the first one
    assert argmax_last(ties).item() == 4100
