"""The runner's device and peer plumbing, with the peer's subprocess mocked (no venv, no model)."""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from lowbit.bench import runner as runner_module
from lowbit.bench.config import BenchConfig
from lowbit.bench.runner import Bench, resolve_device
from lowbit.models.loading import ModelSource


def matrix(tmp_path, **fields) -> BenchConfig:
    return BenchConfig.model_validate({
        "version": 1, "output": str(tmp_path / "out"),
        "models": [{"name": "tiny", "source": "unused"}],
        "schemes": ["w3a16-asym-g64", "w4a16-sym-g64"],
        "methods": [{"name": "lowbit-rtn", "recipe": {"method": "rtn"}},
                    {"name": "autoround-light", "peer": "autoround", "peer_args": {"iters": 50, "lr": 0.005}}],
        "calibration": {"source": "valid.txt"}, "perplexity": {"file": "test.txt"}, **fields,
    })


def fake_peer_venv(root, name: str) -> None:
    python = root / name / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")


def run_peer_with(monkeypatch, tmp_path, config: BenchConfig) -> tuple[dict, list[str], dict]:
    """Run one peer cell against a mocked subprocess.run that answers "n/a"; return the cell, command, env."""
    fake_peer_venv(tmp_path / "peers", "autoround")
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        out = tmp_path / command[command.index("--out") + 1]
        out.mkdir(parents=True)
        device = command[command.index("--device") + 1]
        (out / "peer.json").write_text(json.dumps({"status": "n/a", "reason": "mocked", "device": device}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(runner_module.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    bench = Bench(config, peers_root=tmp_path / "peers", drivers=tmp_path / "drivers")
    source = ModelSource("tiny", tmp_path / "model")  # a folder source: the peer gets it as it is
    cell = bench.run_peer("tiny", None, None, source, torch.zeros(2, 8, dtype=torch.int64), "w3a16-asym-g64",
                          config.methods[1], None)
    return cell, seen["command"], seen["env"]


def test_peer_gets_the_device_and_an_environment_without_pythonpath(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site:src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cell, command, env = run_peer_with(monkeypatch, tmp_path, matrix(tmp_path))
    assert command[:2] == [str(tmp_path / "peers" / "autoround" / "bin" / "python"),
                           str(tmp_path / "drivers" / "run_autoround.py")]
    assert command[command.index("--model") + 1] == str(tmp_path / "model")
    assert command[command.index("--device") + 1] == "cpu"
    assert command[-4:] == ["--iters", "50", "--lr", "0.005"]
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1"
    assert cell == {"status": "n/a", "tool": "autoround", "reason": "mocked", "versions": None, "device": "cpu",
                    "device_name": None}


def test_cuda_config_reaches_the_peer(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, command, _ = run_peer_with(monkeypatch, tmp_path, matrix(tmp_path, device="auto"))
    assert command[command.index("--device") + 1] == "cuda"


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="sees no GPU.*use device: cpu or auto"):
        resolve_device("cuda")


def test_cli_runs_only_the_chosen_cells_with_overrides(monkeypatch, tmp_path):
    from lowbit.cli import app

    config_path = tmp_path / "bench.yaml"
    config_path.write_text(matrix(tmp_path).model_dump_json())  # JSON is YAML
    chosen = {}

    class RecordingBench:
        def __init__(self, config, peers_root, drivers):
            chosen["config"] = config

        def run(self):
            return []

    monkeypatch.setattr(runner_module, "Bench", RecordingBench)
    result = CliRunner().invoke(app, ["bench", "--config", str(config_path), "--only-schemes", "w4a16-sym-g64",
                                      "--only-methods", "autoround-light", "--set", "perplexity.max_windows=4",
                                      "--set", "models.tiny.source=elsewhere.gguf"])
    assert result.exit_code == 0, result.output
    config = chosen["config"]
    assert config.schemes == ["w4a16-sym-g64"] and [m.name for m in config.methods] == ["autoround-light"]
    assert config.perplexity.max_windows == 4 and config.models[0].source == "elsewhere.gguf"
    assert (tmp_path / "out" / "report.md").exists()

    result = CliRunner().invoke(app, ["bench", "--config", str(config_path), "--only-methods", "gptq"])
    assert result.exit_code == 2 and "method gptq not in the config" in result.output
    result = CliRunner().invoke(app, ["bench", "--config", str(config_path), "--set", "device"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_a_finished_peer_output_is_reused_not_recomputed(monkeypatch, tmp_path):
    """A run stopped after a peer finished (llm-compressor AWQ: an hour on 2 cores) measures that output again."""
    fake_peer_venv(tmp_path / "peers", "autoround")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = tmp_path / command[command.index("--out") + 1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "peer.json").write_text(json.dumps({"status": "ok", "seconds": 3427.0, "device": "cpu"}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(runner_module.subprocess, "run", fake_run)
    monkeypatch.setattr(runner_module.lowbit, "load", lambda folder, device: (None, None))
    monkeypatch.setattr(
        Bench, "measure", lambda self, model, tokenizer, original, windows: {"perplexity": 1.0}
    )
    monkeypatch.chdir(tmp_path)
    config = matrix(tmp_path)
    source = ModelSource("tiny", tmp_path / "model")
    ids = torch.zeros(2, 8, dtype=torch.int64)

    def cell(method, scheme="w3a16-asym-g64"):
        bench = Bench(config, peers_root=tmp_path / "peers", drivers=tmp_path / "drivers")
        return bench.run_peer("tiny", None, None, source, ids, scheme, method, None)

    first, again = cell(config.methods[1]), cell(config.methods[1])
    assert len(calls) == 1 and first["status"] == again["status"] == "ok" and again["seconds"] == 3427.0
    cell(config.methods[1], "w4a16-sym-g64")  # another cell, another output folder: runs
    changed = config.methods[1].model_copy(update={"peer_args": {"iters": 200}})
    cell(changed)  # same folder, different command: runs again
    assert len(calls) == 3 and calls[2][-2:] == ["--iters", "200"]

    def crashing_run(command, **kwargs):  # killed halfway: peer.json still says "ok" from the earlier run
        if "--out" in command:  # (platform.processor() also runs a command)
            calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "killed")

    monkeypatch.setattr(runner_module.subprocess, "run", crashing_run)
    failed = cell(config.methods[1])
    assert failed["status"] == "failed" and failed["reason"].startswith("exit code 1 after ")
    assert failed["reason"].endswith("last output: killed") and failed["log_tail"] == "killed"
    monkeypatch.setattr(runner_module.subprocess, "run", fake_run)
    cell(config.methods[1])  # the interrupted run's folder is not taken for the finished one
    assert len(calls) == 5


def test_peer_failure_reason_is_one_line() -> None:
    from lowbit.bench.runner import peer_failure

    log = "(15/31): Calibrating:  52%|#   | 66/128\r(15/31): Calibrating:  53%|#   | 68/128\r\n"
    assert peer_failure(-15, 6061.4, log) == "killed by signal 15 after 6061 s; last output: (15/31): Calibrating:  53%|#   | 68/128"
    assert peer_failure(2, 1.0, "") == "exit code 2 after 1 s; last output: (none)"
