"""The bench protocol shared by the SmolLM2 scripts (gptq_vs_rtn.py, activations.py, methods.py): the model, the
calibration set and the perplexity windows, and a JSON file of finished cells so an interrupted run resumes.

Protocol v1: calibration ``num_samples`` x ``seqlen`` tokens drawn from wiki.valid.tokens with seed 0; perplexity on
the first ``max_windows`` non-overlapping windows of ``seqlen`` tokens of wiki.test.joined.txt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.data.calibration import CalibrationSet, load_calibration, tokenize_text
from lowbit.eval.perplexity import token_windows
from lowbit.models.loading import ModelSource, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


class Cells(dict):
    """Finished cells by key, kept in ``folder/cells.json`` (written after every cell)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "cells.json"
        super().__init__(json.loads(self.path.read_text()) if self.path.exists() else {})

    def record(self, key: str, value: dict) -> None:
        self[key] = value
        self.path.write_text(json.dumps(self, indent=2))
        print(f"{key}: {value}", flush=True)


@dataclass
class Protocol:
    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    calibration: CalibrationSet
    windows: torch.Tensor


def load_protocol(model: str, data: Path, device: str, num_samples: int = 128, seqlen: int = 512,
                  max_windows: int = 64) -> Protocol:
    torch.manual_seed(0)
    original, tokenizer, source = load_model(model, device=device)
    calibration = load_calibration(data / "wiki.valid.tokens", tokenizer, num_samples, seqlen, seed=0)
    text = (data / "wiki.test.joined.txt").read_text()
    windows = token_windows(tokenize_text(tokenizer, text), seqlen, max_windows)
    return Protocol(original, tokenizer, source, calibration, windows)
