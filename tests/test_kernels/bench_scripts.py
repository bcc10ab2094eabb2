"""The benchmark scripts of bench/ as modules, for tests that check what they do to the kernels' source."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def bench_module(name: str) -> ModuleType:
    """A script of bench/ imported as a module. Its bench modules are imported under their own names (bench/kernels.py
    would otherwise meet the ``kernels`` package that transformers imports, or shadow it), then dropped from
    ``sys.modules`` again and whatever they shadowed put back."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    names = {path.stem for path in bench.glob("*.py")}
    shadowed = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(bench))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(bench))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(shadowed)
