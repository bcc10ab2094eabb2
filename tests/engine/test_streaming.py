"""Streamed, lazily loaded, resumable quantization: same checkpoint as the in-memory path, byte-identical resume,
and a pre-flight memory check that refuses before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lowbit
from conftest import calibration_ids, make_model_folder, tiny_config
from lowbit.engine.calibration import Target, _HessianHooks, capture_layer_inputs
from lowbit.engine.memory import MemoryBudgetError, MemoryEstimate, parse_bytes, plan_memory
from lowbit.export.writer import MANIFEST_NAME, partial_folder
from lowbit.models.arch import find_decoder_layers
from lowbit.models.lazy import load_lazy

RECIPE = lowbit.Recipe().updated(**{"weights.group_size": 32})
TESTS = Path(__file__).resolve().parents[1]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    result = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            result.update({key: handle.get_tensor(key) for key in handle.keys()})
    return result


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "opt", "gpt2"])
def test_streamed_checkpoint_equals_the_in_memory_one_and_loads_with_same_logits(family, tmp_path):
    folder = make_model_folder(tmp_path, family)
    ids = calibration_ids()
    streamed, report = lowbit.quantize_to_folder(folder, tmp_path / "streamed", RECIPE, ids, device="cpu", progress=False, profile=True)
    in_memory = lowbit.quantize(str(folder), RECIPE, ids, progress=False)
    eager = lowbit.save(in_memory, tmp_path / "eager")

    expected, got = tensors(eager), tensors(streamed)
    assert set(expected) == set(got)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert json.loads((streamed / "config.json").read_text()) == json.loads((eager / "config.json").read_text())
    with torch.no_grad():
        reference = in_memory.model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32).eval()(ids).logits
    assert float((reference - loaded).norm() / reference.norm()) < 1e-5

    manifest = json.loads((streamed / MANIFEST_NAME).read_text())
    assert set(manifest["report"]["phases"]) >= {"capture", "load", "hessian", "quantize", "propagate", "write", "save"}
    assert manifest["report"]["memory"]["estimate"]["activations_on"] == "cpu"
    assert [r.name for r in report.linears] == [r.name for r in in_memory.report.linears]
    assert not partial_folder(streamed).exists() and not (streamed / "lowbit_progress.json").exists()


def test_lazy_model_holds_one_layer_at_a_time(tmp_path):
    lazy, _, _ = load_lazy(make_model_folder(tmp_path, "llama"))
    layers = lazy.decoder.layers
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    assert not any(p.is_meta for n, p in lazy.model.named_parameters() if not n.startswith("model.layers."))
    lazy.load_layer(1)
    assert not any(p.is_meta for p in layers[1].parameters()) and all(p.is_meta for p in layers[0].parameters())
    lazy.release_layer(1)
    assert all(p.is_meta for p in layers[1].parameters())


def test_prefetched_layer_equals_a_direct_read_and_read_errors_surface_at_load(tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path, "llama")
    direct, _, _ = load_lazy(folder)
    ahead, _, _ = load_lazy(folder)
    direct.load_layer(1)
    ahead.prefetch_layer(1)
    ahead.prefetch_layer(1)  # asking twice reads once
    ahead.prefetch_layer(len(ahead.decoder.layers))  # past the last layer: nothing to read
    assert list(ahead._prefetched) == [1]
    assert all(p.is_meta for p in ahead.decoder.layers[1].parameters())  # read, not installed, until load_layer
    ahead.load_layer(1)
    expected = dict(direct.decoder.layers[1].named_parameters())
    assert all(torch.equal(expected[n], p) for n, p in ahead.decoder.layers[1].named_parameters())
    assert not ahead._prefetched

    ahead.prefetch_layer(0)
    ahead.discard_prefetched()  # after a failure: nothing read ahead is kept
    assert not ahead._prefetched

    def broken(plan):
        raise OSError("disk gone")

    monkeypatch.setattr(ahead, "_read", broken)
    ahead.prefetch_layer(0)
    with pytest.raises(OSError, match="disk gone"):
        ahead.load_layer(0)


@pytest.mark.parametrize("read_ahead", [False, True])
def test_lazily_read_nan_weights_are_refused_by_name(tmp_path, read_ahead):
    from safetensors.torch import load_file, save_file

    from lowbit.models.loading import ModelSourceError

    folder = make_model_folder(tmp_path, "llama")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    lazy, _, _ = load_lazy(folder)
    lazy.load_layer(0)
    if read_ahead:
        lazy.prefetch_layer(1)
    with pytest.raises(ModelSourceError, match=r"non-finite.*layers\.1\.mlp\.up_proj"):
        lazy.load_layer(1)


def test_shared_inputs_are_detected_over_many_batches():
    from conftest import tiny_model

    model = tiny_model("llama")
    decoder = find_decoder_layers(model)
    batches = list(torch.split(calibration_ids(n=8), 2))
    hidden, kwargs = capture_layer_inputs(model, decoder, batches, torch.device("cpu"), torch.device("cpu"))
    layer = decoder.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    hooks = _HessianHooks([Target(n, layer.get_submodule(n), 0) for n in names], torch.device("cpu"))
    with torch.no_grad():
        for states, extra in zip(hidden, kwargs, strict=True):
            hooks.new_batch()
            layer(states, **extra)
    hooks.remove()
    assert hooks.shared_with == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                                 "mlp.up_proj": "mlp.gate_proj"}


def three_layer_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path / "three-layers"
    model.save_pretrained(folder)
    torch.save(calibration_ids(), tmp_path / "ids.pt")
    return folder


RUN = """
import os, signal, sys, torch
import lowbit
from lowbit.engine.streaming import ShardStore
import json
folder, out, ids, kill_after, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
changes = json.loads(sys.argv[6])
if kill_after >= 0:  # die as soon as layer kill_after is written (by the background writer)
    write = ShardStore._write_layer
    def write_then_die(self, index, *args):
        write(self, index, *args)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    ShardStore._write_layer = write_then_die
recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "weights.bits": 3, "weights.symmetric": False}, **changes)
lowbit.quantize_to_folder(folder, out, recipe, torch.load(ids), device="cpu", resume=resume, progress=False)
"""


def run(folder: Path, out: Path, ids: Path, kill_after: int = -1, resume: bool = False,
        changes: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", RUN, str(folder), str(out), str(ids), str(kill_after), "1" if resume else "0",
               json.dumps(changes or {})]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("changes", [{}, {"blockwise.iterations": 3, "blockwise.target": "full_precision"}],
                         ids=["gptq", "blockwise-fp-stream"])
def test_killed_run_resumes_to_a_byte_identical_checkpoint(tmp_path, changes):
    """The second case also rebuilds the full-precision stream through the finished layers' original weights."""
    folder = three_layer_folder(tmp_path)
    ids = tmp_path / "ids.pt"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    completed = run(folder, reference, ids, changes=changes)
    assert completed.returncode == 0, completed.stderr

    killed = run(folder, resumed, ids, kill_after=1, changes=changes)
    assert killed.returncode != 0 and not resumed.exists()
    progress = json.loads((partial_folder(resumed) / "lowbit_progress.json").read_text())
    assert sorted(progress["layers"]) == ["0", "1"]

    finished = run(folder, resumed, ids, resume=True, changes=changes)
    assert finished.returncode == 0, finished.stderr
    names = sorted(p.name for p in reference.iterdir() if p.name != MANIFEST_NAME)
    assert names == sorted(p.name for p in resumed.iterdir() if p.name != MANIFEST_NAME)
    assert len([n for n in names if n.endswith(".safetensors")]) == 4
    for name in names:
        assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    manifest = json.loads((resumed / MANIFEST_NAME).read_text())
    assert manifest["report"]["memory"]["resumed_layers"] == 2
    assert len(manifest["report"]["layers"]) == 3


def test_resume_refuses_a_partial_run_of_another_job(tmp_path):
    folder = three_layer_folder(tmp_path)
    out = tmp_path / "out"
    assert run(folder, out, tmp_path / "ids.pt", kill_after=0).returncode != 0
    with pytest.raises(ValueError, match="different recipe"):
        lowbit.quantize_to_folder(folder, out, RECIPE, calibration_ids(), device="cpu", resume=True, progress=False)


def test_impossible_memory_budget_is_refused_before_any_work(tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path, "llama")
    from lowbit.engine import sequential

    def no_work(*args, **kwargs):
        raise AssertionError("quantization started")

    monkeypatch.setattr(sequential, "capture_layer_inputs", no_work)
    with pytest.raises(MemoryBudgetError, match=r"over the budget of 1\.00 KiB .*captured activations"):
        lowbit.quantize_to_folder(folder, tmp_path / "out", RECIPE, calibration_ids(), device="cpu",
                                  max_cpu_memory="1KiB", progress=False)
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()


def test_cli_refuses_impossible_budget(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    folder = make_model_folder(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text("the a of " * 100)
    result = CliRunner().invoke(app, ["quantize", str(folder), "--out", str(tmp_path / "q"), "--method", "rtn",
                                      "--group-size", "32", "--device", "cpu", "--max-cpu-memory", "1KiB"])
    assert result.exit_code == 2 and "--max-cpu-memory" in result.output


def test_activation_placement_follows_the_policy_and_the_budgets():
    estimate = MemoryEstimate(layer_weights=1000, hessians=1000, gptq_workspace=1000, batch_workspace=1000,
                              outside_layers=500, captured_activations=10_000, whole_model=0, compute_on_gpu=True)
    # auto: page-locked CPU memory, the GPU only when the CPU budget cannot hold them
    assert plan_memory(estimate, max_gpu_bytes=100_000, max_cpu_bytes=None).activations_on == "cpu"
    assert plan_memory(estimate, max_gpu_bytes=100_000, max_cpu_bytes=5_000).activations_on == "gpu"
    # gpu: there when it fits the GPU budget
    assert plan_memory(estimate, max_gpu_bytes=100_000, max_cpu_bytes=None, activations="gpu").activations_on == "gpu"
    assert plan_memory(estimate, max_gpu_bytes=5_000, max_cpu_bytes=None, activations="gpu").activations_on == "cpu"
    assert plan_memory(estimate, max_gpu_bytes=None, max_cpu_bytes=None, activations="cpu").activations_on == "cpu"
    with pytest.raises(MemoryBudgetError, match="even with the captured activations on the CPU"):
        plan_memory(estimate, max_gpu_bytes=2_500, max_cpu_bytes=None)
    with pytest.raises(MemoryBudgetError, match="CPU memory"):
        plan_memory(estimate, max_gpu_bytes=5_000, max_cpu_bytes=12_000)
    with pytest.raises(ValueError, match="auto, gpu or cpu"):
        plan_memory(estimate, max_gpu_bytes=None, max_cpu_bytes=None, activations="disk")


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 1024**3 and parse_bytes("80GB") == 80 * 1000**3 and parse_bytes("512 MiB") == 512 * 1024**2
    with pytest.raises(ValueError, match="like 24GiB"):
        parse_bytes("lots")


def test_fit_batch_size_halves_until_the_gpu_budget_fits():
    from lowbit.engine.memory import fit_batch_size

    def estimate_for(batch_size: int) -> MemoryEstimate:
        return MemoryEstimate(layer_weights=10, hessians=10, gptq_workspace=10, batch_workspace=5 * batch_size,
                              outside_layers=0, captured_activations=100, whole_model=0, compute_on_gpu=True)

    assert fit_batch_size(estimate_for, 8, None) == 8  # no budget: as asked
    assert fit_batch_size(estimate_for, 8, 100) == 8  # 20 + max(10, 40) fits
    assert fit_batch_size(estimate_for, 8, 45) == 4  # 20 + max(10, 20): forward and GPTQ phases do not overlap
    assert fit_batch_size(estimate_for, 8, 20) == 8  # nothing fits: plan_memory raises with the breakdown


def test_a_background_write_error_stops_the_run_and_keeps_the_finished_layers(tmp_path, monkeypatch):
    """Layers are written by a background thread; its failure is raised in the run (not lost), and the layers
    written before it stay in the partial folder, resumable."""
    from lowbit.engine.streaming import ShardStore

    folder = three_layer_folder(tmp_path)
    write = ShardStore._write_layer

    def fail_on_layer_1(self, index, *args):
        if index == 1:
            raise OSError("disk full (simulated)")
        write(self, index, *args)

    monkeypatch.setattr(ShardStore, "_write_layer", fail_on_layer_1)
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32, "weights.bits": 3, "weights.symmetric": False})
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        lowbit.quantize_to_folder(folder, out, recipe, torch.load(tmp_path / "ids.pt"), device="cpu", progress=False)
    progress = json.loads((partial_folder(out) / "lowbit_progress.json").read_text())
    assert sorted(progress["layers"]) == ["0"] and not out.exists()


def test_a_failed_write_of_the_outside_shard_stops_the_run_at_the_next_layer(tmp_path, monkeypatch):
    """The embedding/head shard is written first, on the writer thread; if that fails, the run stops at the next
    layer boundary with the error (not after every layer has been computed), leaving no output."""
    import lowbit.engine.streaming as streaming

    folder = three_layer_folder(tmp_path)
    write = streaming.write_shard
    layers_written = []

    def fail_outside(target, name, state):
        if any(not key.startswith("model.layers.") for key in state):
            raise OSError("disk full (simulated)")
        layers_written.append(name)
        return write(target, name, state)

    monkeypatch.setattr(streaming, "write_shard", fail_outside)
    recipe = lowbit.Recipe().updated(**{"weights.group_size": 32})
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        lowbit.quantize_to_folder(folder, out, recipe, torch.load(tmp_path / "ids.pt"), device="cpu", progress=False)
    assert len(layers_written) < 3 and not out.exists()
