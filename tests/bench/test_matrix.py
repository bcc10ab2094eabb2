"""The benchmark matrix end to end on a tiny model folder: lowbit cells, a missing peer, cache, report."""

import json

import pytest
import yaml

from conftest import make_model_folder, word_text
from lowbit.bench.config import BenchConfig, nominal_bits_per_weight, scheme_overrides
from lowbit.bench.report import comparisons, write_report
from lowbit.bench.runner import Bench


def test_scheme_names():
    assert scheme_overrides("w3a16-asym-g64") == {"weights.bits": 3, "weights.symmetric": False, "weights.group_size": 64}
    assert scheme_overrides("w4a16-sym-channel")["weights.group_size"] == -1
    assert nominal_bits_per_weight("w4a16-sym-g64") == pytest.approx(4 + 16 / 64)
    assert nominal_bits_per_weight("w3a16-asym-g64") == pytest.approx(3 + 19 / 64)
    with pytest.raises(ValueError, match="not understood"):
        scheme_overrides("int4")


def test_matrix_runs_caches_and_reports(tmp_path, tokenizer_folder):
    folder = make_model_folder(tmp_path, "llama", tokenizer_folder)
    text = word_text(tmp_path / "text.txt", 8000)
    config_path = tmp_path / "bench.yaml"
    config_path.write_text(yaml.safe_dump({
        "version": 1, "output": str(tmp_path / "out"),
        "models": [{"name": "tiny", "source": str(folder)}],
        "schemes": ["w4a16-sym-g32", "w2a16-asym-g32"],
        "methods": [{"name": "lowbit-rtn", "recipe": {"method": "rtn"}}, {"name": "lowbit-gptq", "recipe": {"method": "gptq"}},
                    {"name": "hqq", "peer": "hqq"}],
        "calibration": {"source": str(text), "num_samples": 8, "seqlen": 64},
        "perplexity": {"file": str(text), "seqlen": 64, "max_windows": 4},
    }))
    config = BenchConfig.from_yaml(config_path)
    bench = Bench(config, peers_root=tmp_path / "no-peers")
    cells = {c["key"]: c for c in bench.run()}
    assert len(cells) == 1 + 2 * 3
    fp = cells["tiny | fp | fp"]
    w4 = cells["tiny | w4a16-sym-g32 | lowbit-gptq"]
    w2 = cells["tiny | w2a16-asym-g32 | lowbit-gptq"]
    assert w4["status"] == "ok" and w4["bits_per_weight"] == pytest.approx(4 + 32 / 32, abs=0.05)  # fp32 scales, shapes
    assert fp["perplexity"] > 1 and 0 < w4["kl_divergence"] < w2["kl_divergence"]  # random model: compare KL
    peer = cells["tiny | w4a16-sym-g32 | hqq"]
    assert peer["status"] == "n/a" and "install.sh hqq" in peer["reason"]

    mtime = (tmp_path / "out" / "cells").stat().st_mtime_ns
    assert len(Bench(config, peers_root=tmp_path / "no-peers").run()) == 7  # all cached: nothing re-run
    assert (tmp_path / "out" / "cells").stat().st_mtime_ns == mtime

    # a failed cell is retried on the next run ("n/a" ones are not)
    failed = tmp_path / "out" / "cells" / "tiny_w4a16-sym-g32_lowbit-rtn.json"
    failed.write_text(json.dumps({"key": "tiny | w4a16-sym-g32 | lowbit-rtn", "status": "failed", "reason": "x"}))
    rerun = {c["key"]: c for c in Bench(config, peers_root=tmp_path / "no-peers").run()}
    assert rerun["tiny | w4a16-sym-g32 | lowbit-rtn"]["status"] == "ok"
    assert rerun["tiny | w4a16-sym-g32 | hqq"]["status"] == "n/a"

    paths = write_report(list(cells.values()), tmp_path / "out", heatmap="tiny | w2a16-asym-g32 | lowbit-gptq")
    report = paths["markdown"].read_text()
    assert "| w2a16-asym-g32 | lowbit-gptq | lowbit | ok |" in report and "n/a" in report
    page = paths["html"].read_text()
    assert page.count("<svg") == 2 and "<table>" in page
    assert json.loads(paths["json"].read_text())


def test_comparisons_state_ahead_and_behind():
    cells = [
        {"key": "m | s | a", "scheme": "s", "method": "lowbit-gptq", "tool": "lowbit", "status": "ok", "perplexity": 30.0},
        {"key": "m | s | b", "scheme": "s", "method": "autoround", "tool": "autoround", "status": "ok", "perplexity": 32.0},
        {"key": "m | t | a", "scheme": "t", "method": "lowbit-gptq", "tool": "lowbit", "status": "ok", "perplexity": 50.0},
        {"key": "m | t | b", "scheme": "t", "method": "hqq", "tool": "hqq", "status": "ok", "perplexity": 40.0},
    ]
    lines = comparisons(cells)
    assert "m s: lowbit (lowbit-gptq) is ahead" in lines[0] and "-2.00" in lines[0]
    assert "m t: lowbit (lowbit-gptq) is behind" in lines[1] and "+10.00" in lines[1]


def test_report_names_the_device_of_each_row_when_devices_differ():
    from lowbit.bench.report import markdown

    cpu = {"device": "cpu", "device_name": "x86_64"}
    gpu = {"device": "cuda", "device_name": "NVIDIA H200"}
    cells = [
        {"key": "m | fp | fp", "tool": "fp", "status": "ok", "perplexity": 20.0, **cpu},
        {"key": "m | s | a", "scheme": "s", "method": "lowbit-gptq", "tool": "lowbit", "status": "ok", "perplexity": 30.0, **cpu},
        {"key": "m | s | b", "scheme": "s", "method": "awq", "tool": "llmcompressor", "status": "ok", "perplexity": 32.0, **gpu},
        {"key": "m | s | c", "scheme": "s", "method": "ar", "tool": "autoround", "status": "failed",
         "reason": "killed by signal 15\nlast | output", **cpu},
    ]  # fmt: skip
    text = markdown(cells)
    assert "cpu (x86_64): 3 cells, cuda (NVIDIA H200): 1 cells" in text
    assert "| 30.00 |" in text and text.count("| x86_64 |") == 2 and text.count("| NVIDIA H200 |") == 1
    assert "failed (killed by signal 15 last / output)" in text  # one table row, whatever the reason holds
    assert "best peer (awq, run on NVIDIA H200)" in comparisons(cells)[0]
    one_device = markdown([c for c in cells if c["device"] == "cpu"])
    assert "| x86_64 |" not in one_device
    # one peer run in two environments: both version records are shown, each named by its device
    twice = [dict(cells[2], versions={"torch": "2.11.0"}),
             dict(cells[2], key="m | t | b", scheme="t", versions={"torch": "2.13.0+cpu"}, **cpu)]  # fmt: skip
    text = markdown(cells + twice)
    assert '"llmcompressor (NVIDIA H200)"' in text and '"llmcompressor (x86_64)"' in text
