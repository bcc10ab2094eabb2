import copy

import pytest
import torch
from torch import nn

from conftest import calibration_ids, requires_smollm2, tiny_model
from lowbit.algorithms.rotation import (
    OnlineHadamard,
    fuse_norms,
    install_online_hadamard,
    install_online_hadamards,
    online_hadamard_modules,
    rotate_model,
)
from lowbit.formats.hadamard import hadamard_matrix
from lowbit.models.arch import UnsupportedArchitectureError, find_decoder_layers

ROTATABLE = ["llama", "qwen2", "qwen3", "mistral", "phi3"]


def with_random_norms_and_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh models have unit norm weights and zero biases, which would hide folding mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def llama(
    hidden_size: int = 64, intermediate_size: int = 128, heads: int = 4, tied: bool = False
) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=320,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("online_down_proj", [False, True], ids=["offline", "online"])
@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_keeps_the_logits(family, online_down_proj):
    model = with_random_norms_and_biases(tiny_model(family))
    ids = calibration_ids(2, 24)
    reference = logits(model, ids)
    report = rotate_model(model, seed=3, online_down_proj=online_down_proj)
    assert relative_difference(logits(model, ids), reference) <= 1e-4
    assert report.online_down_proj == online_down_proj
    assert report.intermediate_sizes == ((128,) if online_down_proj else ())
    assert (report.hidden_size, report.seed) == (64, 3)
    assert report.head_dim == 16
    assert model.lowbit_rotation is report
    layers = find_decoder_layers(model).layers
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(64)) for layer in layers)
    down = layers[0].mlp.down_proj
    assert type(down) is nn.Linear
    assert getattr(down, "lowbit_online_hadamard", None) == (128 if online_down_proj else None)


def test_tied_embeddings_are_untied_and_keep_the_logits():
    model = with_random_norms_and_biases(tiny_model("llama"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = calibration_ids(2, 24)
    reference = logits(model, ids)
    assert fuse_norms(model) is True
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert relative_difference(logits(model, ids), reference) <= 1e-5
    report = rotate_model(model)
    assert report.untied_embeddings is False  # already untied by the explicit fuse_norms
    assert relative_difference(logits(model, ids), reference) <= 1e-4


def test_bfloat16_weights_stay_bfloat16_and_the_logits_move_only_by_rounding():
    model = with_random_norms_and_biases(tiny_model("qwen3")).to(torch.bfloat16)
    ids = calibration_ids(2, 24)
    reference = logits(model, ids).float()
    rotate_model(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert relative_difference(logits(model, ids).float(), reference) <= 3e-2  # bf16 rounding of the weights


def test_non_power_of_two_sizes_use_paley_factors_and_keep_the_logits():
    # hidden 48 = 12 * 4, intermediate 96 = 12 * 8, head_dim 12: every rotation has a Paley factor
    model = with_random_norms_and_biases(llama(hidden_size=48, intermediate_size=96, tied=True))
    ids = calibration_ids(2, 24)
    reference = logits(model, ids)
    report = rotate_model(model, seed=1)
    assert (report.hidden_size, report.head_dim, report.intermediate_sizes) == (48, 12, (96,))
    assert report.untied_embeddings is True
    assert relative_difference(logits(model, ids), reference) <= 1e-4


def max_to_rms(x: torch.Tensor) -> float:
    """Mean over tokens of max|x| / rms(x): about sqrt(features) for one dominant channel, ~3 when flat."""
    x = x.reshape(-1, x.shape[-1]).float()
    return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())


def activation_flatness(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(max/rms of the residual stream entering each layer, max/rms of the down_proj inputs), worst layer."""
    down_inputs = []
    handles = [
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: down_inputs.append(args[0]))
        for layer in find_decoder_layers(model).layers
    ]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]  # the last one is normed
    for handle in handles:
        handle.remove()
    return max(map(max_to_rms, hidden)), max(map(max_to_rms, down_inputs))


def model_with_outliers() -> nn.Module:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 40.0  # a massive residual channel, as in real LLMs
        for layer in find_decoder_layers(model).layers:
            layer.mlp.up_proj.weight[7] *= 40.0  # one huge intermediate channel into down_proj
    return model


def test_rotation_flattens_the_residual_stream_and_the_down_proj_input():
    model = model_with_outliers()
    ids = calibration_ids(2, 24)
    residual_before, down_before = activation_flatness(model, ids)
    assert residual_before > 5 and down_before > 5  # the outliers dominate (sqrt(64) = 8, sqrt(128) = 11)

    offline = rotate_model(copy.deepcopy(model), online_down_proj=False)
    assert offline.online_modules == ()
    rotated = copy.deepcopy(model)
    rotate_model(rotated)
    residual_after, down_after = activation_flatness(rotated, ids)
    assert residual_after < 0.5 * residual_before
    assert down_after < 0.5 * down_before  # the forward hook registered later sees the rotated input
    assert relative_difference(logits(rotated, ids), logits(model, ids)) <= 1e-4


def test_down_proj_input_stays_spiky_without_the_online_transform():
    model = model_with_outliers()
    ids = calibration_ids(2, 24)
    _, down_before = activation_flatness(model, ids)
    rotate_model(model, online_down_proj=False)
    _, down_after = activation_flatness(model, ids)
    assert down_after > 0.8 * down_before


def test_online_hook_applies_the_hadamard_matrix_and_reinstalls_idempotently():
    linear = nn.Linear(12, 3)
    x = torch.randn(5, 12)
    seen = []
    linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # registered first
    install_online_hadamard(linear)
    install_online_hadamard(linear)
    assert sum(isinstance(h, OnlineHadamard) for h in linear._forward_pre_hooks.values()) == 1
    assert linear.lowbit_online_hadamard == 12
    out = linear(x)
    expected = x @ hadamard_matrix(12)
    assert torch.allclose(seen[0], expected, atol=1e-6)  # the transform runs before any other pre-hook
    assert torch.allclose(out, expected @ linear.weight.T + linear.bias, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        install_online_hadamard(linear, 16)


def test_rotated_checkpoint_reloads_with_the_online_transform_reinstalled(tmp_path):
    from transformers import AutoModelForCausalLM

    model = with_random_norms_and_biases(tiny_model("llama"))  # tied embeddings
    ids = calibration_ids(2, 24)
    reference = logits(model, ids)
    rotate_model(model)
    copied = copy.deepcopy(model)  # the hook survives a deep copy
    assert relative_difference(logits(copied, ids), reference) <= 1e-4
    sizes = online_hadamard_modules(model)
    assert sizes == {"model.layers.0.mlp.down_proj": 128, "model.layers.1.mlp.down_proj": 128}

    model.save_pretrained(tmp_path / "rotated")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated", dtype=torch.float32).eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert relative_difference(logits(loaded, ids), reference) > 1e-2  # without the transform: wrong
    install_online_hadamards(loaded, sizes)
    assert relative_difference(logits(loaded, ids), reference) <= 1e-4


def test_rotating_twice_is_refused():
    model = tiny_model("qwen2")
    rotate_model(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "opt", "gpt2"])
def test_unsupported_families_are_refused_before_anything_changes(family):
    model = tiny_model(family)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedArchitectureError, match="without rotation"):
        rotate_model(model)
    with pytest.raises(UnsupportedArchitectureError, match="cannot be rotated"):
        fuse_norms(model)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_unsupported_intermediate_size_asks_to_turn_off_the_online_transform():
    model = llama(intermediate_size=92)  # 92 = 4 * 23: no Paley construction
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="online_down_proj=False"):
        rotate_model(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # nothing was changed
    ids = calibration_ids(2, 24)
    reference = logits(model, ids)
    rotate_model(model, online_down_proj=False)
    assert relative_difference(logits(model, ids), reference) <= 1e-4


@requires_smollm2
@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_keeps_its_logits_when_rotated():
    from lowbit.models.loading import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    ids = tokenizer(
        "The capital of France is Paris, and the capital of Italy is", return_tensors="pt"
    ).input_ids
    reference = logits(model, ids)
    report = rotate_model(model)
    assert (report.hidden_size, report.head_dim, report.intermediate_sizes) == (576, 64, (1536,))
    assert report.untied_embeddings
    assert relative_difference(logits(model, ids), reference) <= 1e-4
