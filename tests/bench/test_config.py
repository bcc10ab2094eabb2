"""The bench config: device, dotted overrides from the command line, and restriction to some schemes/methods."""

import pytest
import yaml

from lowbit.bench.config import BenchConfig

MATRIX = {
    "version": 1,
    "models": [{"name": "tiny", "source": "smollm2-135m"}],
    "schemes": ["w3a16-asym-g64", "w2a16-asym-g64", "w4a16-sym-g64"],
    "methods": [{"name": "lowbit-rtn", "recipe": {"method": "rtn"}}, {"name": "lowbit-gptq"},
                {"name": "hqq", "peer": "hqq"}],
    "calibration": {"source": "data/valid.txt"},
    "perplexity": {"file": "data/test.txt"},
}


def test_device_defaults_to_cpu_and_accepts_cuda_and_auto():
    assert BenchConfig.model_validate(MATRIX).device == "cpu"
    for device in ("cuda", "auto"):
        assert BenchConfig.model_validate({**MATRIX, "device": device}).device == device
    with pytest.raises(ValueError, match="device"):
        BenchConfig.model_validate({**MATRIX, "device": "gpu"})


def test_overrides_reach_fields_lists_by_name_or_position_and_stay_cwd_relative(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.txt").write_text("x")
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(MATRIX))

    plain = BenchConfig.from_yaml(path)
    assert plain.calibration.source == str(tmp_path / "data" / "valid.txt")  # found next to the config file

    config = BenchConfig.from_yaml(path, {"calibration.source": "carry/valid.txt", "perplexity.max_windows": 8,
                                          "models.tiny.source": "/models/smol.gguf", "device": "cuda"})
    assert config.calibration.source == "carry/valid.txt"  # as given: relative to the current directory
    assert config.perplexity.max_windows == 8 and config.perplexity.file == "data/test.txt"
    assert config.models[0].source == "/models/smol.gguf" and config.device == "cuda"
    assert BenchConfig.model_validate(MATRIX).updated({"methods.2.peer_method": "hqq"}).methods[2].peer_method == "hqq"

    with pytest.raises(ValueError, match="unknown bench config field 'perplexity.window'"):
        plain.updated({"perplexity.window": 8})
    with pytest.raises(ValueError, match="no entry named 'smol'.*entries: tiny"):
        plain.updated({"models.smol.source": "x"})
    with pytest.raises(ValueError, match="device"):
        plain.updated({"device": "tpu"})


def test_restricted_keeps_the_config_order_and_names_what_exists():
    config = BenchConfig.model_validate(MATRIX)
    chosen = config.restricted(["w4a16-sym-g64", "w3a16-asym-g64"], ["hqq", "lowbit-rtn"])
    assert chosen.schemes == ["w3a16-asym-g64", "w4a16-sym-g64"]
    assert [m.name for m in chosen.methods] == ["lowbit-rtn", "hqq"]
    assert config.restricted(None, None) == config
    with pytest.raises(ValueError, match="scheme w8a16-sym-g64 not in the config; choose from w3a16-asym-g64"):
        config.restricted(["w8a16-sym-g64"], None)
    with pytest.raises(ValueError, match="method autoround not in the config"):
        config.restricted(None, ["autoround"])
