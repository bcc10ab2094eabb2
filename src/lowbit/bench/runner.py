"""Run the benchmark matrix: every cell quantized by its tool, every output measured by lowbit's evaluator.

Each cell's result is written to ``OUTPUT/cells/<slug>.json`` as soon as it is measured, so an interrupted
run resumes where it stopped. Peers run in their own virtual environments (``bench/peers/install.sh``)
through their drivers, on the same FP model folder and the same calibration token ids (saved once by
lowbit); a peer that cannot express a scheme answers "n/a" with its reason, recorded as such.

Everything runs on the config's ``device``: lowbit quantizes and evaluates there, and each peer driver gets
``--device``. A peer's environment is the runner's without ``PYTHONPATH``, so a peer venv sees only its own
packages (and, when built with ``--system-site-packages``, the interpreter's), never the runner's site folders.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console

import lowbit
from lowbit.bench.config import BenchConfig, MethodEntry, nominal_bits_per_weight, scheme_overrides
from lowbit.data.calibration import load_calibration, tokenize_text
from lowbit.eval.perplexity import divergence, perplexity, token_windows
from lowbit.models.loading import load_model
from lowbit.recipe import Recipe

logger = logging.getLogger(__name__)
console = Console(stderr=True)


def cell_key(model: str, scheme: str, method: str) -> str:
    return f"{model} | {scheme} | {method}"


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def resolve_device(name: str) -> str:
    """The config's ``device`` as torch names it: ``auto`` is cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device cuda requested but torch {torch.__version__} sees no GPU "
                         f"(CUDA build: {torch.version.cuda}); use device: cpu or auto")
    return name


def device_name(device: str) -> str:
    """The hardware behind ``device``, for the record (GPU model, or the CPU's architecture)."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()


PEER_COMMAND = "command.json"  # written next to a peer's output once its driver exited successfully


def finished_peer_run(out: Path, command: list[str]) -> bool:
    """Whether ``out`` holds the complete, successful output of exactly ``command``."""
    try:
        recorded = json.loads((out / PEER_COMMAND).read_text())
        record = json.loads((out / "peer.json").read_text())
    except (OSError, ValueError):
        return False
    return recorded == command and record.get("status") == "ok"


def peer_environment() -> dict[str, str]:
    """The runner's environment without PYTHONPATH: a peer venv must import only its own packages."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


class Bench:
    def __init__(self, config: BenchConfig, peers_root: Path = Path(".peers"), drivers: Path = Path("bench/peers")):
        self.config = config
        self.output = Path(config.output)
        self.cells_dir = self.output / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.peers_root = peers_root
        self.drivers = drivers

    @functools.cached_property
    def device(self) -> str:
        """The resolved device (resolved on first use, so a report can be rebuilt where that device is missing)."""
        return resolve_device(self.config.device)

    def cached(self, key: str) -> dict | None:
        """The stored result of a cell; a cell that failed is retried (returns None), an "n/a" one is not."""
        path = self.cells_dir / f"{slug(key)}.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        return None if result.get("status") == "failed" else result

    def store(self, key: str, result: dict) -> dict:
        result = {"key": key, **result}
        (self.cells_dir / f"{slug(key)}.json").write_text(json.dumps(result, indent=2, default=str))
        summary = {k: result.get(k) for k in ("status", "perplexity", "kl_divergence", "bits_per_weight", "seconds",
                                              "device")}
        console.print(f"[bold]{key}[/bold]: {summary}")
        return result

    def results(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.cells_dir.glob("*.json"))]

    # -- measurement ---------------------------------------------------------------------------------
    def measure(self, model, tokenizer, reference, windows) -> dict:
        metrics = {"perplexity": perplexity(model, windows).perplexity}
        if reference is not None and self.config.kl_divergence:
            div = divergence(reference, model, windows)
            metrics.update(kl_divergence=div.kl_divergence, top1_agreement=div.top1_agreement)
        if self.config.zeroshot is not None:
            from lowbit.eval.zeroshot import evaluate_zeroshot

            z = self.config.zeroshot
            metrics["zeroshot"] = evaluate_zeroshot(model, tokenizer, z.tasks, Path(z.task_dir), z.limit, z.batch_size,
                                                    progress=False)
        return metrics

    # -- the matrix ----------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        for entry in self.config.models:
            pending = [(s, m) for s in self.config.schemes for m in self.config.methods
                       if self.cached(cell_key(entry.name, s, m.name)) is None]
            fp_key = cell_key(entry.name, "fp", "fp")
            if not pending and self.cached(fp_key):
                continue
            original, tokenizer, source = load_model(entry.source, device=self.device)
            calibration = load_calibration(self.config.calibration.source, tokenizer, self.config.calibration.num_samples,
                                           self.config.calibration.seqlen, self.config.calibration.seed)
            text = Path(self.config.perplexity.file).read_text(encoding="utf-8")
            windows = token_windows(tokenize_text(tokenizer, text), self.config.perplexity.seqlen,
                                    self.config.perplexity.max_windows)
            if self.cached(fp_key) is None:
                self.store(fp_key, {"status": "ok", "tool": "fp", "bits_per_weight": 32.0, **self.device_record(),
                                    **self.measure(original, tokenizer, None, windows)})
            for scheme, method in pending:
                key = cell_key(entry.name, scheme, method.name)
                try:
                    if method.is_peer:
                        result = self.run_peer(entry.name, original, tokenizer, source, calibration.input_ids, scheme, method, windows)
                    else:
                        result = self.run_lowbit(entry.name, original, tokenizer, source, calibration, scheme, method, windows)
                except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as error:
                    logger.exception("cell %s failed", key)
                    result = {"status": "failed", "reason": f"{type(error).__name__}: {error}", **self.device_record()}
                self.store(key, {"model": entry.name, "scheme": scheme, "method": method.name, **result})
        return self.results()

    def device_record(self) -> dict:
        return {"device": self.device, "device_name": device_name(self.device)}

    def run_lowbit(self, model_name, original, tokenizer, source, calibration, scheme, method: MethodEntry, windows) -> dict:
        base = Recipe.from_yaml(method.recipe_file) if method.recipe_file else Recipe()
        recipe = base.updated(**method.recipe).updated(**scheme_overrides(scheme))
        recipe = recipe.updated(**{"calibration.num_samples": calibration.input_ids.shape[0],
                                   "calibration.seqlen": calibration.input_ids.shape[1],
                                   "calibration.seed": self.config.calibration.seed})
        started = time.perf_counter()
        quantized = lowbit.quantize(copy.deepcopy(original), recipe, calibration, tokenizer=tokenizer,
                                    device=self.device, progress=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # kernels still queued belong to the quantization time
        seconds = time.perf_counter() - started
        quantized.source = source
        folder = lowbit.save(quantized, self.output / "checkpoints" / slug(cell_key(model_name, scheme, method.name)),
                             overwrite=True)
        from lowbit.eval.size import checkpoint_size

        size = checkpoint_size(folder)
        layers = [{"name": r.name, "layer": r.layer, "output_error": r.output_error, "weight_error": r.weight_error}
                  for r in quantized.report.linears if r.status == "quantized"]
        metrics = self.measure(quantized.model, tokenizer, original, windows)
        return {"status": "ok", "tool": "lowbit", "version": lowbit.__version__, "recipe": recipe.model_dump(mode="json"),
                "seconds": seconds, "bits_per_weight": size["bits_per_weight"], "bits_per_weight_kind": "stored",
                "checkpoint_bytes": size["checkpoint_bytes"], "layers": layers, **self.device_record(), **metrics}

    def fp_folder(self, model_name, original, tokenizer, source) -> Path:
        if source.gguf_file is None:
            return source.folder
        folder = self.output / "models" / f"{slug(model_name)}-fp"
        if not (folder / "config.json").exists():
            # A GGUF source is dequantized at load but keeps transformers' gguf quantizer marker, which refuses
            # save_pretrained; the weights are plain floats, so write them without the marker.
            quantizer = getattr(original, "hf_quantizer", None)
            marker = original.config.__dict__.pop("quantization_config", None)
            original.hf_quantizer = None
            try:
                original.save_pretrained(folder)
            finally:
                original.hf_quantizer = quantizer
                if marker is not None:
                    original.config.quantization_config = marker
            tokenizer.save_pretrained(folder)
        return folder

    def run_peer(self, model_name, original, tokenizer, source, ids, scheme, method: MethodEntry, windows) -> dict:
        python = self.peers_root / method.peer / "bin" / "python"
        if not python.exists():
            return {"status": "n/a", "tool": method.peer,
                    "reason": f"{method.peer} is not installed in {self.peers_root}: run bash bench/peers/install.sh "
                              f"{method.peer} (offline: bench/peers/install_offline.sh WHEEL_DIR {method.peer})"}
        calibration_file = self.output / f"calibration-{slug(model_name)}.pt"
        if not calibration_file.exists():
            torch.save(ids.clone(), calibration_file)
        out = self.output / "peers" / slug(cell_key(model_name, scheme, method.name))
        command = [str(python), str(self.drivers / f"run_{method.peer}.py"), "--model",
                   str(self.fp_folder(model_name, original, tokenizer, source)), "--calibration", str(calibration_file),
                   "--scheme", scheme, "--out", str(out), "--device", self.device]
        if method.peer_method:
            command += ["--method", method.peer_method]
        for key, value in method.peer_args.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        started = time.perf_counter()
        if finished_peer_run(out, command):
            # The same command already finished (a run stopped while measuring it): a peer can take an hour on a
            # 2-core CPU (llm-compressor AWQ: 57 min), so its output is measured again rather than recomputed.
            logger.info("%s: reusing the finished peer output in %s", method.name, out)
        else:
            (out / PEER_COMMAND).unlink(missing_ok=True)  # an interrupted run must not look finished later
            completed = subprocess.run(command, capture_output=True, text=True,
                                       timeout=self.config.peer_timeout_seconds, env=peer_environment())
            if completed.returncode != 0:
                record = json.loads((out / "peer.json").read_text()) if (out / "peer.json").exists() else {}
                if record.get("status") != "n/a":
                    return {"status": "failed", "tool": method.peer,
                            "reason": peer_failure(completed.returncode, time.perf_counter() - started, completed.stderr),
                            "log_tail": completed.stderr[-2000:], **self.device_record()}  # fmt: skip
            (out / PEER_COMMAND).write_text(json.dumps(command))
        seconds = time.perf_counter() - started
        record = json.loads((out / "peer.json").read_text()) if (out / "peer.json").exists() else {}
        if record.get("status") == "n/a":
            return {"status": "n/a", "tool": method.peer, "reason": record.get("reason"), "versions": record.get("versions"),
                    "device": record.get("device", "cpu"), "device_name": record.get("device_name")}
        model, _ = lowbit.load(out, device=self.device)
        metrics = self.measure(model, tokenizer, original, windows)
        return {"status": "ok", "tool": method.peer, "versions": record.get("versions"), "peer_config": record.get("config"),
                "device": record.get("device", "cpu"), "device_name": record.get("device_name"),
                "seconds": record.get("seconds", seconds), "bits_per_weight": nominal_bits_per_weight(scheme),
                "bits_per_weight_kind": "nominal (codes + fp16 scale + zero point per group)", **metrics}


def peer_failure(returncode: int, seconds: float, stderr: str) -> str:
    """One readable line for a peer run that failed: how it ended, after how long, and its last line of output.

    Progress bars rewrite their line with carriage returns, so the last line is where the run stopped.
    """
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    return f"{how} after {seconds:.0f} s; last output: {lines[-1][:300] if lines else '(none)'}"
