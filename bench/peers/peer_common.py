"""Shared pieces of the peer drivers (run_llmcompressor.py, run_autoround.py, run_hqq.py).

Each driver runs inside its peer's own virtual environment (``.peers/<name>/bin/python``), so this file
imports only what every peer venv has: torch, transformers, safetensors and the standard library. It
must not import lowbit (the peer venvs do not install it).

Contract of every driver:
    --model DIR           an HF causal-LM folder (safetensors + config + tokenizer)
    --calibration FILE    torch.save'd int64 tensor [num_samples, seqlen] of token ids made by lowbit
                          (or a dict with "input_ids"); every tool sees exactly these samples
    --scheme NAME         w{bits}a16-{sym|asym}-{g<group>|channel}, e.g. w3a16-asym-g64
    --method NAME         the peer's algorithm (gptq, awq, autoround, hqq)
    --out DIR             gets a dequantized (fake-quant) HF folder and peer.json
    --device NAME         cpu (default) or cuda[:N]: where the peer quantizes. With cpu the GPUs are hidden
                          (CUDA_VISIBLE_DEVICES=""), since llm-compressor picks an accelerator by itself

peer.json holds {"status": "ok", tool, version, method, scheme, config, seconds, device, ...} or
{"status": "n/a", "reason": ...} when the peer cannot express the scheme (nothing is approximated).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCHEMES = ("w4a16-sym-g64", "w3a16-asym-g64", "w2a16-asym-g64", "w4a16-sym-channel")
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
_SCHEME_PATTERN = re.compile(
    r"^w(?P<bits>[2-8])a16-(?P<symmetry>sym|asym)-(?P<group>g(?P<size>\d+)|channel)$"
)


@dataclass(frozen=True)
class Scheme:
    """Weight-only integer quantization scheme: bits, symmetry and group size (None = per output channel)."""

    name: str
    bits: int
    symmetric: bool
    group_size: int | None


def parse_scheme(name: str) -> Scheme:
    """Parse ``w3a16-asym-g64`` style names; raise with the accepted form on anything else."""
    match = _SCHEME_PATTERN.match(name.strip().lower())
    if match is None:
        raise SystemExit(
            f"scheme {name!r} not understood; use w<bits>a16-<sym|asym>-<g<size>|channel>, e.g. {', '.join(SCHEMES)}"
        )
    size = match.group("size")
    return Scheme(
        name=name,
        bits=int(match.group("bits")),
        symmetric=match.group("symmetry") == "sym",
        group_size=int(size) if size else None,
    )


def build_parser(description: str, methods: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument(
        "--calibration", type=Path, required=True, help="torch tensor file [n, seqlen] of ids"
    )
    parser.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)} (or same pattern)")
    parser.add_argument("--method", default=methods[0], choices=methods)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the peer quantizes (default cpu)")
    return parser


def select_device(name: str) -> str:
    """Check ``--device`` and make it hold for the whole process; call before any CUDA use.

    With ``cpu`` the GPUs are hidden (``CUDA_VISIBLE_DEVICES=""``): llm-compressor's sequential pipeline
    onloads every layer to the first accelerator it finds, whatever device the model was loaded on.
    """
    if not _DEVICE_PATTERN.match(name):
        raise SystemExit(f"--device {name!r} not understood; use cpu or cuda[:N]")
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return name
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} in this venv sees no GPU; use --device cpu")
    return name


def device_record(name: str) -> dict[str, str]:
    """``{"device": ..., "device_name": ...}`` for peer.json (the GPU model, or the CPU architecture)."""
    if name.startswith("cuda"):
        import torch

        return {"device": name, "device_name": torch.cuda.get_device_name(name)}
    return {"device": name, "device_name": platform.processor() or platform.machine()}


def load_calibration_ids(path: Path) -> Any:
    """The [num_samples, seqlen] int64 token-id tensor lowbit wrote (plain tensor or {"input_ids": ...})."""
    import torch

    if not path.is_file():
        raise SystemExit(
            f"calibration file {path} not found; write it with lowbit (torch.save of [n, seqlen] ids)"
        )
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        data = data["input_ids"]
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise SystemExit(
            f"{path} must hold an integer tensor [num_samples, seqlen], got {type(data).__name__}"
        )
    return data.to(torch.int64)


def load_model(model_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load an HF causal LM in fp32 on ``device`` and its tokenizer, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise SystemExit(
            f"{model_dir} is not an HF model folder (no config.json); see bench/peers/make_fp_model.py"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval().to(device)
    return model, tokenizer


def save_dequantized(model_dir: Path, state_dict: dict[str, Any], out_dir: Path) -> list[str]:
    """Write a plain HF folder: the original architecture with ``state_dict``'s tensors (fp32) loaded.

    A fresh copy of the model is loaded from ``model_dir`` and every tensor it shares a name with is
    replaced (dequantized linears, and norms rescaled by smoothing methods such as AWQ). Returns the names
    of the model tensors that were *not* found in ``state_dict`` (normally only tied duplicates).
    """
    import torch

    fresh, tokenizer = load_model(model_dir)
    target = fresh.state_dict()
    missing = []
    with torch.no_grad():
        for name, tensor in target.items():
            if name in state_dict:
                source = state_dict[name]
                if tuple(source.shape) != tuple(tensor.shape):
                    raise SystemExit(
                        f"{name}: peer gave shape {tuple(source.shape)}, model has {tuple(tensor.shape)}"
                    )
                tensor.copy_(source.to(tensor.dtype))
            else:
                missing.append(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return missing


def versions(*packages: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in (*packages, "torch", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = platform.python_version()
    return found


def write_peer_json(out_dir: Path, record: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "peer.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def write_ok(
    out_dir: Path, tool: str, method: str, scheme: Scheme, packages: tuple[str, ...], seconds: float, **fields: Any
) -> Path:
    """Record a successful peer run: the fields every driver writes, then the driver's own ``fields``."""
    import torch

    record = {"status": "ok", "tool": tool, "method": method, "scheme": asdict(scheme), "versions": versions(*packages)}
    record.update(fields)
    if "device" in fields:
        record.update(device_record(fields["device"]))
    record.update(seconds=round(seconds, 2), threads=torch.get_num_threads())
    return write_peer_json(out_dir, record)


def write_not_available(
    out_dir: Path, tool: str, method: str, scheme: Scheme, reason: str, **extra: Any
) -> None:
    """Record that the peer cannot express the scheme, leaving no model files behind."""
    if out_dir.exists():
        for child in out_dir.iterdir():
            if child.name != "peer.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    write_peer_json(
        out_dir,
        {
            "status": "n/a",
            "reason": reason,
            "tool": tool,
            "method": method,
            "scheme": asdict(scheme),
            "versions": versions(*extra.pop("packages", ())),
            **(device_record(extra.pop("device")) if "device" in extra else {}),
            **extra,
        },
    )


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as timer: ...; timer.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
