"""The two CLI verbs end to end on a tiny model folder: quantize (with a recipe file) then eval."""

import json

import pytest
from typer.testing import CliRunner

from conftest import make_model_folder, word_text
from lowbit.cli import app

runner = CliRunner()


def test_quantize_then_eval(tmp_path, tokenizer_folder):
    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text = word_text(tmp_path / "text.txt", 6000)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nmethod: gptq\nweights:\n  bits: 4\n  group_size: 32\n")
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(folder), "--recipe", str(recipe), "--bits", "3", "--asymmetric",
                                 "--calibration", str(text), "--num-samples", "8", "--seqlen", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["recipe"]["weights"] == {**manifest["recipe"]["weights"], "bits": 3, "symmetric": False, "group_size": 32}
    assert manifest["report"]["calibration"]["tokens"] == 8 * 64
    assert (out / "tokenizer.json").exists()

    results = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--seqlen", "64", "--max-windows", "4", "--json", str(results)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(results.read_text())
    assert metrics["reference"] == str(folder)
    assert metrics["perplexity"]["windows"] == 4 and metrics["perplexity"]["perplexity"] > 1
    assert metrics["divergence"]["kl_divergence"] > 0 and 0 < metrics["divergence"]["top1_agreement"] <= 1


def test_recipe_command_prints_defaults():
    result = runner.invoke(app, ["recipe"])
    assert result.exit_code == 0 and "version: 1" in result.output and "method: gptq" in result.output



@pytest.mark.slow
def test_generate_on_cpu_runs_the_reference_path(tmp_path, tokenizer_folder):
    """The decode runtime itself is checked against transformers' greedy tokens in tests/test_kernels."""
    import lowbit

    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    out = tmp_path / "q"
    quantized = lowbit.quantize(str(folder), lowbit.Recipe(method="rtn").updated(**{"weights.group_size": 32}), progress=False)
    lowbit.save(quantized, out)
    result = runner.invoke(app, ["generate", str(out), "--prompt", "the a of and", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tokens/s (3 decode steps)" in result.output


def test_activation_rotation_and_kv_flags_end_to_end(tmp_path, tokenizer_folder):
    """W4A8 + rotation + a recorded KV scheme from flags; eval and generate then use the KV cache."""
    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text = word_text(tmp_path / "text.txt", 6000)
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(folder), "--method", "rtn", "--bits", "4", "--group-size", "-1",
                                 "--act-bits", "8", "--rotate", "hadamard", "--kv-bits", "4", "--kv-residual", "8", "--kv-group-size", "16",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["recipe"]["activations"]["bits"] == 8 and manifest["recipe"]["rotation"]["kind"] == "hadamard"
    assert manifest["rotation"]["online_hadamards"] and manifest["recipe"]["kv_cache"]["bits"] == 4

    results = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--seqlen", "64", "--max-windows", "2",
                                 "--no-reference", "--kv-bits", "2", "--json", str(results)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(results.read_text())
    assert metrics["kv_cache"]["scheme"].startswith("KV int2") and "residual 8" in metrics["kv_cache"]["scheme"]
    assert metrics["kv_cache"]["compression"] > 1 and metrics["kv_cache"]["perplexity"] > 1

    result = runner.invoke(app, ["generate", str(out), "--prompt", "the a of and", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "with KV int4" in result.output
