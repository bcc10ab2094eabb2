"""The quantized KV cache: exact spans, generate(), evaluation semantics, memory report, real SmolLM2."""

import pytest
import torch

from conftest import (
    FAMILIES,
    WIKI_TEST,
    calibration_ids,
    requires_smollm2,
    requires_wikitext,
    tiny_config,
    tiny_model,
)
from lowbit.eval.kv import copy_selection, perplexity_with_kv_cache
from lowbit.eval.perplexity import perplexity
from lowbit.formats.kv import quantize_keys, quantize_values
from lowbit.kvcache import KVCacheScheme, QuantizedKVCache, QuantizedKVLayer, kv_memory_report

FULL_PRECISION = KVCacheScheme(bits=2, residual=10_000, group_size=8)  # everything in the residual window


def feed(layer: QuantizedKVLayer, keys: torch.Tensor, values: torch.Tensor, chunks: list[int]):
    start = 0
    for size in chunks:
        out_keys, out_values = layer.update(keys[..., start : start + size, :], values[..., start : start + size, :])
        start += size
    return out_keys, out_values


@pytest.mark.parametrize("chunks", [[37], [1] * 37, [5, 1, 9, 16, 6]], ids=["prefill", "decode", "mixed"])
@pytest.mark.parametrize("scheme", [
    KVCacheScheme(bits=2, group_size=8, residual=6, intact_tokens=3),
    KVCacheScheme(bits=4, group_size=16),
    KVCacheScheme(format="fp8", residual=4, intact_tokens=1),
], ids=["int2-r6-i3", "int4", "fp8-r4-i1"])
def test_intact_prefix_and_residual_window_are_exact_and_the_rest_quantized(scheme, chunks):
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 37, 16, generator=generator), torch.randn(2, 2, 37, 16, generator=generator)
    out_keys, out_values = feed(QuantizedKVLayer(scheme), keys, values, chunks)
    intact, residual = scheme.intact_tokens, scheme.residual
    value_end = 37 - residual
    key_end = intact + (value_end - intact) // scheme.key_block * scheme.key_block
    # exact: the intact prefix, the residual window, and keys waiting for their block
    assert torch.equal(out_keys[..., :intact, :], keys[..., :intact, :])
    assert torch.equal(out_values[..., :intact, :], values[..., :intact, :])
    assert torch.equal(out_values[..., value_end:, :], values[..., value_end:, :])
    assert torch.equal(out_keys[..., key_end:, :], keys[..., key_end:, :])
    # quantized in between, with the same grids however the tokens arrived
    expected_keys = quantize_keys(keys[..., intact:key_end, :], scheme.bits, scheme.fp8, scheme.group_size)
    expected_values = quantize_values(values[..., intact:value_end, :], scheme.bits, scheme.fp8, scheme.group_size)
    assert torch.equal(out_keys[..., intact:key_end, :], expected_keys)
    assert torch.equal(out_values[..., intact:value_end, :], expected_values)
    assert not torch.equal(expected_values, values[..., intact:value_end, :])


def test_scheme_validation_says_what_to_do():
    with pytest.raises(ValueError, match="use bits=8"):
        KVCacheScheme(bits=4, format="fp8")
    with pytest.raises(ValueError, match="bits must be one of"):
        KVCacheScheme(bits=3)
    with pytest.raises(ValueError, match="residual is a number of tokens"):
        KVCacheScheme(residual=-1)
    layer = QuantizedKVLayer(KVCacheScheme(bits=4, group_size=64))
    with pytest.raises(ValueError, match="does not divide head_dim 16 .*use one of 16, 8"):
        layer.update(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16))


def test_crop_is_refused_inside_the_quantized_part():
    layer = QuantizedKVLayer(KVCacheScheme(bits=4, group_size=8, residual=4))
    feed(layer, torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8), [20])
    layer.crop(-3)  # only the residual window
    assert layer.get_seq_length() == 17
    with pytest.raises(ValueError, match="already quantized"):
        layer.crop(-5)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.key_end == layer.value_end == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_8bit_cache_gives_the_same_greedy_tokens(family):
    model = tiny_model(family)
    prompt = calibration_ids(2, 12, seed=1)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    reference = model.generate(prompt, **kwargs)
    int8 = model.generate(prompt, past_key_values=QuantizedKVCache(KVCacheScheme(bits=8, group_size=16),
                                                                   model.config), **kwargs)
    assert torch.equal(int8, reference)
    cache = QuantizedKVCache(KVCacheScheme(bits=2, group_size=8))
    int2 = model.generate(prompt, past_key_values=cache, **kwargs)
    assert int2.shape == reference.shape
    assert cache.get_seq_length() == reference.shape[1] - 1  # the last token is never fed back


def test_logit_error_grows_as_bits_fall_and_shrinks_with_a_residual_window():
    model = tiny_model("llama").double()  # float64: no rounding-boundary noise between the two paths
    ids = calibration_ids(2, 48, seed=2)
    with torch.no_grad():
        reference = model(input_ids=ids).logits

        def error(scheme: KVCacheScheme) -> float:
            cache = QuantizedKVCache(scheme, model.config)
            logits = torch.cat([model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits
                                for i in range(ids.shape[1])], dim=1)
            return float((logits - reference).norm() / reference.norm())

        errors = {bits: error(KVCacheScheme(bits=bits, group_size=8)) for bits in (8, 4, 2)}
        with_residual = error(KVCacheScheme(bits=2, group_size=8, residual=16))
    assert errors[8] < 0.1 * errors[4] and errors[4] < 0.5 * errors[2], errors  # steps shrink 17x, 5x
    assert with_residual < 0.8 * errors[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_precision_scheme_matches_plain_perplexity(family):
    model = tiny_model(family)
    windows = calibration_ids(3, 32, seed=3)
    reference = perplexity(model, windows)
    exact = perplexity_with_kv_cache(model, windows, FULL_PRECISION)
    chunked = perplexity_with_kv_cache(model, windows, FULL_PRECISION, chunk_size=5, batch_size=2)
    for result in (exact, chunked):
        assert result.perplexity == pytest.approx(reference.perplexity, rel=1e-4)
        assert result.predicted_tokens == reference.predicted_tokens == 3 * 31


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2-sliding8"])
def test_one_pass_evaluation_equals_token_by_token_decoding(family):
    """The exact one-pass formulation and a real cache fed one token at a time agree (float64, so that no
    rounding boundary is crossed differently by the two paths; the losses are summed in float32 as in
    ``perplexity``)."""
    if family == "gemma2-sliding8":
        from transformers import AutoModelForCausalLM

        config = tiny_config("gemma2")
        config.sliding_window = 8
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        model = tiny_model(family)
    model = model.double()
    windows = calibration_ids(2, 24, seed=4)
    scheme = KVCacheScheme(bits=2, group_size=8, residual=3, intact_tokens=2)
    one_pass = perplexity_with_kv_cache(model, windows, scheme).perplexity
    decoded = perplexity_with_kv_cache(model, windows, scheme, chunk_size=1).perplexity
    assert one_pass == pytest.approx(decoded, rel=1e-6)
    assert one_pass != pytest.approx(perplexity(model, windows).perplexity, rel=1e-6)  # quantization shows


def test_copy_selection_picks_exactly_one_copy_per_causal_pair():
    scheme = KVCacheScheme(bits=2, group_size=4, residual=2, intact_tokens=1)
    selection = copy_selection(12, scheme).reshape(12, 3, 12)
    assert torch.equal(selection.sum(1), torch.tril(torch.ones(12, 12, dtype=torch.long)))
    # query 9 (10 tokens cached): intact 0; values 1..7 quantized; keys 1..4 (one whole block); 8, 9 exact
    row = selection[9]
    assert row[0].nonzero().flatten().tolist() == [0, 8, 9]
    assert row[1].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert row[2].nonzero().flatten().tolist() == [5, 6, 7]


def test_memory_report_for_a_tiny_llama():
    config = tiny_config("llama")  # 2 layers, 2 kv heads, head_dim 16
    report = kv_memory_report(config, KVCacheScheme(bits=4, group_size=16), tokens=64, batch_size=3)
    assert report.fp16_bytes == 3 * 2 * 2 * 2 * 64 * 16 * 2
    per_head = 2 * 64 * 16 // 2 + 4 * 16 * 4 + 64 * 4  # codes, key grids (4 blocks x 16 channels), value grids
    assert report.quantized_bytes == 3 * 2 * 2 * per_head
    assert report.ratio == pytest.approx(16 / 6)  # 4 bits + 32 bits of grid per 16 elements
    assert report.saved_bytes == report.fp16_bytes - report.quantized_bytes


@requires_smollm2
@requires_wikitext
@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_kv2_is_worse_than_kv8_and_a_residual_window_helps():
    from lowbit.data.calibration import tokenize_text
    from lowbit.eval.perplexity import token_windows
    from lowbit.models.loading import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    windows = token_windows(tokenize_text(tokenizer, WIKI_TEST.read_text()), 256, 2)
    fp = perplexity(model, windows).perplexity
    ppl = {name: perplexity_with_kv_cache(model, windows, scheme).perplexity for name, scheme in {
        "kv8": KVCacheScheme(bits=8), "kv2": KVCacheScheme(bits=2), "kv2-r128": KVCacheScheme(bits=2, residual=128),
    }.items()}
    assert ppl["kv8"] == pytest.approx(fp, rel=0.01)
    assert ppl["kv2"] > 1.1 * ppl["kv8"]
    assert ppl["kv2-r128"] < ppl["kv2"]
