"""What a quantization run did, linear by linear: the record users read and the manifest stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from rich.console import Console
from rich.table import Table

Status = Literal["quantized", "skipped", "uncalibrated"]


@dataclass
class LinearRecord:
    """One linear module's fate. ``output_error`` is ``||(W-Q)X||^2 / ||WX||^2`` on calibration inputs;
    ``weight_error`` is ``||W-Q||^2 / ||W||^2``."""

    name: str
    status: Status
    layer: int | None
    in_features: int
    out_features: int
    reason: str = ""
    scheme: str = ""
    method: str = ""
    weight_error: float | None = None
    output_error: float | None = None
    dampening: float | None = None
    dead_columns: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stored: str = "compressed"  # or "dense": quantized values stored as plain weights (no compressed form)
    kept_columns: int = 0  # OWQ: input columns kept in 16 bits


@dataclass
class LayerRecord:
    index: int
    seconds: float
    mean_output_error: float | None
    max_dampening: float | None


@dataclass
class QuantizationReport:
    method: str
    scheme: str
    linears: list[LinearRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (lowbit.engine.profile)
    # seconds of work done on side threads, overlapping the phases (e.g. the GPTQ kernel's warm-up), and how long the
    # engine then waited for it (that wait is also inside a phase)
    background: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # the pre-flight estimate and the measured peaks, in bytes
    transforms: list[dict] = field(default_factory=list)  # rotations and SmoothQuant foldings, in order

    def counts(self) -> dict[str, int]:
        result = {"quantized": 0, "skipped": 0, "uncalibrated": 0}
        for record in self.linears:
            result[record.status] += 1
        return result

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "scheme": self.scheme,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "calibration": self.calibration,
            "phases": {phase: round(seconds, 3) for phase, seconds in self.phases.items()},
            "background": {name: round(seconds, 3) for name, seconds in self.background.items()},
            "memory": self.memory,
            "transforms": self.transforms,
            "layers": [asdict(layer) for layer in self.layers],
            "linears": [asdict(record) for record in self.linears],
        }

    def render(self, console: Console | None = None, phases: bool = False) -> None:
        """Print the per-layer summary, every linear that was not quantized and, with ``phases``, the time
        spent in each phase."""
        console = console or Console(stderr=True)
        table = Table(title=f"lowbit {self.method.upper()} {self.scheme}", show_lines=False)
        for column in ("layer", "linears", "mean rel. output error", "worst linear", "damping", "seconds"):
            table.add_column(column, justify="right" if column != "worst linear" else "left")
        for layer in self.layers:
            members = [r for r in self.linears if r.layer == layer.index and r.status == "quantized"]
            errors = [(r.output_error if r.output_error is not None else r.weight_error or 0.0, r) for r in members]
            worst = max(errors, key=lambda item: item[0], default=(0.0, None))
            table.add_row(
                str(layer.index),
                str(len(members)),
                "-" if layer.mean_output_error is None else f"{layer.mean_output_error:.4g}",
                "-" if worst[1] is None else f"{worst[1].name.rsplit('.', 2)[-2]}.{worst[1].name.rsplit('.', 1)[-1]} {worst[0]:.3g}",
                "-" if layer.max_dampening is None else f"{layer.max_dampening:g}",
                f"{layer.seconds:.1f}",
            )
        console.print(table)
        counts = self.counts()
        console.print(
            f"linears: {counts['quantized']} quantized, {counts['skipped']} skipped, "
            f"{counts['uncalibrated']} uncalibrated; {self.calibration.get('tokens', 0)} calibration tokens; "
            f"{self.seconds:.1f} s"
        )
        for record in self.linears:
            if record.status != "quantized":
                console.print(f"  [yellow]{record.status}[/yellow] {record.name}: {record.reason}")
            elif record.stored == "dense":
                console.print(f"  [cyan]stored dense[/cyan] {record.name}: {record.reason}")
        smoothed = [t for t in self.transforms if t.get("kind") == "smoothquant"]
        if smoothed:
            alphas = sorted({t["alpha"] for t in smoothed})
            console.print(f"SmoothQuant: {len(smoothed)} inputs smoothed, alpha {', '.join(f'{a:g}' for a in alphas)}; "
                          f"scales {min(t['min_scale'] for t in smoothed):.3g}..{max(t['max_scale'] for t in smoothed):.3g}")
        for transform in self.transforms:
            if transform.get("kind") == "rotation":
                console.print(f"rotation: {transform.get('description', transform)}")
        for line in _method_summaries(self.transforms):
            console.print(line)
        if phases and self.phases:
            self.render_phases(console)

    def render_phases(self, console: Console) -> None:
        table = Table(title="where the time went")
        for column in ("phase", "seconds", "share"):
            table.add_column(column, justify="left" if column == "phase" else "right")
        total = sum(self.phases.values()) or 1.0  # the phases do not overlap
        for phase, seconds in sorted(self.phases.items(), key=lambda item: -item[1]):
            table.add_row(phase, f"{seconds:.2f}", f"{100 * seconds / total:.1f}%")
        table.add_row("total", f"{total:.2f}", "100%")
        console.print(table)
        for name, seconds in self.background.items():
            console.print(f"  {name.replace('_', ' ')}: {seconds:.2f} s (on a side thread)")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _method_summaries(transforms: list[dict]) -> list[str]:
    """One line each for AWQ, the two-stage refinement and block-wise reconstruction (details in the manifest)."""
    lines = []
    scaled = [t for t in transforms if t.get("kind") == "awq"]
    if scaled:
        ratios = [t["loss"] / t["baseline_loss"] for t in scaled if t["baseline_loss"] > 0]
        lines.append(f"AWQ: {len(scaled)} inputs scaled, alpha {min(t['alpha'] for t in scaled):g}.."
                     f"{max(t['alpha'] for t in scaled):g}; block output error x{_mean(ratios):.3g} of unscaled (mean)")
    refined = [t["stage2_output_error"] for t in transforms if "stage2_output_error" in t]
    if refined:
        lines.append(f"two-stage stage 2: {len(refined)} GPTQ calls, mean rel. output error "
                     f"{_mean([r['before'] for r in refined]):.4g} -> {_mean([r['after'] for r in refined]):.4g}")
    blocks = [t["block_output_mse"] for t in transforms if t.get("kind") == "blockwise"]
    if blocks:
        lines.append(f"block-wise: {len(blocks)} layers, mean block output MSE "
                     f"{_mean([b['before'] for b in blocks]):.4g} -> {_mean([b['after'] for b in blocks]):.4g}")
    lines += sorted({t["note"] for t in transforms if t.get("note")})
    return lines
