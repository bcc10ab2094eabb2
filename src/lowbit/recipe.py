"""The recipe: one typed, versioned description of a quantization job.

The same model backs the Python API, YAML files (``lowbit quantize --recipe r.yaml``) and the CLI flags, so
every default is written once, here. Unknown keys are errors (``extra="forbid"``), and YAML is read with
``yaml.safe_load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightScheme(_Strict):
    """How each target weight is represented.

    bits: integer width of the stored codes (2..8).
    symmetric: codes centred on zero (no zero point) or affine (scale and zero point).
    group_size: number of consecutive input channels sharing one scale; -1 means one scale per output
        channel (per-channel).
    clip: "minmax" uses each group's range as is; "mse" searches a shrink factor of the range that
        minimises the group's squared error (as in the GPTQ reference implementation's ``mse`` option).
    """

    bits: int = Field(4, ge=2, le=8)
    format: Literal["int", "fp8"] = Field(
        "int", description='"fp8": float8 e4m3 values with one scale per output channel (bits must be 8)'
    )
    symmetric: bool = True
    group_size: int = 128
    clip: Literal["minmax", "mse"] = "mse"
    mse_grid: int = Field(100, ge=10, le=1000, description="shrink factors tried by clip='mse'")
    mse_max_shrink: float = Field(0.8, gt=0.0, lt=1.0, description="largest fraction of the range cut off")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("group_size must be a positive number of input channels or -1 (per-channel)")
        return value

    @model_validator(mode="after")
    def _fp8(self) -> WeightScheme:
        if self.format == "fp8" and (self.bits != 8 or not self.symmetric or self.group_size != -1):
            raise ValueError("fp8 weights are float8 e4m3 with one scale per output channel: use bits 8, "
                             "symmetric true, group_size -1")
        return self

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    def describe(self) -> str:
        if self.format == "fp8":
            return "W8 fp8 e4m3 per-channel"
        group = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"W{self.bits} {'sym' if self.symmetric else 'asym'} {group}"


class ActivationScheme(_Strict):
    """Quantization of the inputs of every target Linear (simulated: quantize-dequantize in the forward pass).

    bits: 4..8 for integers; 8 for fp8.
    format: "int" or "fp8" (float8 e4m3, scale = amax / 448).
    dynamic: one scale per token computed at run time (True), or one per-tensor scale calibrated on the
        calibration data (False; needs calibration even with RTN weights).
    symmetric: integer grids centred on zero, or affine with a zero point (int only).
    clip_ratio: fraction of each token's (or the tensor's) absolute maximum kept; QuaRot uses 0.9 at 4 bits.
    """

    bits: int = Field(8, ge=4, le=8)
    format: Literal["int", "fp8"] = "int"
    dynamic: bool = True
    symmetric: bool = True
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _fp8(self) -> ActivationScheme:
        if self.format == "fp8" and (self.bits != 8 or not self.symmetric):
            raise ValueError("fp8 activations are float8 e4m3: use bits 8 and symmetric true")
        return self

    def describe(self) -> str:
        kind = "fp8" if self.format == "fp8" else ("sym" if self.symmetric else "asym")
        return f"A{self.bits} {kind} {'per-token dynamic' if self.dynamic else 'per-tensor static'}"


class SmoothQuantOptions(_Strict):
    """SmoothQuant (Xiao et al., ICML 2023, https://arxiv.org/abs/2211.10438): per-input-channel scales
    ``s = max|X|^alpha / max|W|^(1 - alpha)`` folded into the preceding norm (and up_proj -> down_proj).

    alpha: the migration strength; a list searches each layer's best value on the calibration data
        (smallest output error of the quantized linears).
    """

    alpha: float | tuple[float, ...] = 0.5
    min_scale: float = Field(1e-5, gt=0.0, description="scales are clamped to [min_scale, 1/min_scale]")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(not 0.0 <= a <= 1.0 for a in values):
            raise ValueError("smoothquant alpha must be in [0, 1] (or a non-empty list of such values)")
        return value

    @property
    def alphas(self) -> tuple[float, ...]:
        return self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)


class RotationOptions(_Strict):
    """Hadamard rotations (QuaRot, Ashkboos et al. 2024; SpinQuant with fixed random Hadamards, Liu et al. 2024).

    kind: "hadamard" (randomized Hadamard on the residual stream, per-head between V and O).
    online_down_proj: also rotate the down-projection input with an online fast Hadamard transform.
    seed: seed of the random signs.
    """

    kind: Literal["hadamard"] = "hadamard"
    online_down_proj: bool = True
    seed: int = 0


class KVCacheOptions(_Strict):
    """KV-cache quantization at inference (KIVI, Liu et al. 2024: keys per-channel, values per-token; IntactKV,
    Liu et al. 2024: the first tokens kept in full precision). Recorded in the checkpoint's manifest and applied
    by ``lowbit eval`` / ``lowbit generate``.

    bits: 8, 4 or 2 (int) or 8 with format "fp8".
    residual: most recent tokens kept in full precision (KIVI's residual window; 0 = none).
    intact_tokens: first tokens kept in full precision (IntactKV; 0 = none).
    group_size: channels per value group and tokens per key group.
    """

    bits: Literal[2, 4, 8] = 8
    format: Literal["int", "fp8"] = "int"
    residual: int = Field(0, ge=0)
    intact_tokens: int = Field(0, ge=0)
    group_size: int = Field(64, ge=1)


class GPTQOptions(_Strict):
    """Options of GPTQ (Frantar et al., ICLR 2023, https://arxiv.org/abs/2210.17323).

    block_size: columns per lazy batch update.
    dampening: fraction of the mean Hessian diagonal added to the diagonal before inversion; raised
        automatically (x10 per retry, at most ``max_dampening``) when the Cholesky factorisation fails, and the
        value used is recorded per layer.
    act_order: process columns in order of decreasing Hessian diagonal ("desc_act").
    static_groups: with act_order, compute every group's scale from the original (unpermuted) weights before
        the permutation, so groups stay contiguous and no g_idx is needed at inference (no effect without
        act_order).
    grid: "scheme" fits each group's grid as ``weights.clip`` says; "leanquant" and "two_stage" use the Hessian
        (their options are the recipe's ``leanquant`` and ``two_stage`` sections).

    Defaults (act_order and static_groups on, with clip="mse" in the weight scheme) are the best of the variants
    measured on SmolLM2-135M (bench/notes/foundation.md): W3 asym g64 perplexity 47.6 against 82.1 for plain
    GPTQ with min-max ranges.
    """

    block_size: int = Field(128, ge=1)
    dampening: float = Field(0.01, gt=0.0)
    max_dampening: float = Field(10.0, gt=0.0)
    act_order: bool = True
    static_groups: bool = True
    grid: Literal["scheme", "leanquant", "two_stage"] = Field(
        "scheme", description='how each group\'s grid is fitted: "scheme" (weights.clip), "leanquant" (options in '
                              '`leanquant`) or "two_stage" (options in `two_stage`; adds stage 2 after GPTQ)')


class AWQOptions(_Strict):
    """AWQ (Lin et al., MLSys 2024, https://arxiv.org/abs/2306.00978): per-input-channel scales ``s = s_x^alpha``
    searched per decoder layer on the block output error and folded into the producer (a norm, or up_proj's
    rows), then a clipping-range search per (row, group). Runs before the layer-wise method (rtn or gptq).

    grid: number of exponents tried, ``alpha = k / grid`` for ``k = 0..grid-1`` (0 = no scaling, always tried).
    weight_exponent: "duo scaling" ``s = s_x^alpha / s_w^(1 - alpha)`` of later AWQ releases.
    clip: search each group's clipping range on its output error after scaling (used when ``gptq.grid`` is
        "scheme"; a Hessian-aware grid replaces it).
    clip_steps / clip_max_shrink: shrink factors ``1 - k * max_shrink / steps`` tried by the clip search.
    search_batches: calibration batches used by the scale search (None = all).
    """

    grid: int = Field(20, ge=2)
    weight_exponent: bool = False
    clip: bool = True
    clip_steps: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    search_batches: int | None = Field(None, ge=1)


class OWQOptions(_Strict):
    """OWQ (Lee et al., AAAI 2024, https://arxiv.org/abs/2306.02272): each linear keeps its most sensitive input
    columns (Hessian diagonal x round-to-nearest error) in 16 bits and GPTQ quantizes the rest, its error
    compensation flowing into the kept columns (``lowbit.algorithms.owq``). Needs ``method: gptq``.

    outlier_budget_bits: extra bits per weight spent on kept columns; ``bits: 3`` with 0.01 is an effective
        3.01 bits (before grid overhead). A kept column of an ``[out, in]`` weight costs ``out * 16 + 32`` bits,
        so keeping a fraction f of the columns costs about ``16 * f`` bits per weight (1% of columns: 0.16).
        The budget is the model's: linears get their share in model order and unspent bits carry to the next,
        so a small model (where 0.01 bits buys no column of any single 576-wide linear) still spends it.
    kept_dtype: how the kept columns are stored.
    """

    outlier_budget_bits: float = Field(0.01, gt=0.0, le=16.0)
    kept_dtype: Literal["float16", "bfloat16"] = "float16"


class TwoStageOptions(_Strict):
    """Two-stage group-scale optimisation (Kim et al., ICASSP 2026), used with ``gptq.grid: two_stage``.

    stage1: "in_gptq" fits each group's grid on its Hessian block when GPTQ reaches it; "static" fits every grid
        before GPTQ (the paper's order); "off" keeps the scheme's grids (stage 2 only).
    stage1_iterations: closed-form scale updates after the shrink search of stage 1.
    stage1_steps / stage1_max_shrink: range shrink factors ``1 - k * max_shrink / steps`` tried by stage 1.
    stage2_sweeps: coordinate-descent sweeps over the group scales after GPTQ, codes frozen (0 = no stage 2).
    """

    stage1: Literal["off", "static", "in_gptq"] = "in_gptq"
    stage1_iterations: int = Field(5, ge=0)
    stage1_steps: int = Field(20, ge=1)
    stage1_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    stage2_sweeps: int = Field(20, ge=0)


class LeanQuantOptions(_Strict):
    """LeanQuant's loss-error-aware grid (Zhang & Shrivastava, ICLR 2025, https://arxiv.org/abs/2407.10032),
    used with ``gptq.grid: leanquant``: each group's (min, max) minimises the squared error weighted by
    ``d_i^-exponent`` (``d_i`` the diagonal of the Cholesky factor of H^-1; 2 is the exact loss error).

    steps / max_shrink: shrink factors ``1 - k * max_shrink / steps`` tried for each end of the range.
    """

    exponent: float = Field(2.0, gt=0.0)
    steps: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0)


class BlockwiseOptions(_Strict):
    """Block-wise output reconstruction (SignRound / AutoRound, Cheng et al. 2024,
    https://arxiv.org/abs/2309.05516): after the layer-wise method, each decoder layer's rounding offsets and
    clipping factors are learned by signed gradient descent so that its output matches the full-precision
    layer's output on the same (quantized-stream) inputs.

    iterations: optimisation steps per decoder layer.
    learning_rate: None = ``1 / iterations`` (AutoRound's default).
    clip_floor: smallest clipping factor (and, starting from the method, ``1 / clip_floor`` the largest).
    batches_per_step: calibration batches averaged in each step.
    checkpoints: times the loss on all batches is measured; the best parameters measured are kept (never worse
        than the start).
    start: "method" starts from the layer-wise method's codes and grids, "rtn" from min-max round-to-nearest.
    target: what the quantized layer's output (on the quantized-stream inputs) is matched to: "quantized" = the
        full-precision layer on the same inputs (each layer fixes only its own error); "full_precision" = the
        full-precision layer on the full-precision model's inputs, kept as a second activation stream (as
        AutoRound does: each layer also corrects the error the earlier layers left; twice the activation memory).
    """

    iterations: int = Field(200, ge=1)
    learning_rate: float | None = Field(None, gt=0.0)
    clip_floor: float = Field(0.5, gt=0.0, le=1.0)
    batches_per_step: int = Field(1, ge=1)
    checkpoints: int = Field(5, ge=1)
    start: Literal["method", "rtn"] = "method"
    target: Literal["quantized", "full_precision"] = "quantized"


class CalibrationOptions(_Strict):
    """Where calibration text comes from and how much of it.

    source: a local text file, a local .jsonl/.parquet file (``text_field`` names the column), or "self"
        (the model writes its own calibration text, Williams et al. 2024, https://arxiv.org/abs/2410.17170).
    min_fraction: fail when fewer than this fraction of the requested tokens can be drawn.
    """

    source: str | None = None
    num_samples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    text_field: str = "text"
    min_fraction: float = Field(0.5, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, description="samples per forward pass during calibration")
    max_batch_tokens: int = Field(
        8192, ge=1, description="at most this many tokens per calibration forward pass: batch_size is lowered for long "
        "samples (8 x 2048 tokens would hold 2.4 GB of MLP activations at Llama-3-8B width; 8192 tokens already "
        "keep a GPU's matrix units busy). Only the float summation order of the Hessians depends on it")

    def batch_size_for(self, seqlen: int) -> int:
        """Samples per forward pass for samples of ``seqlen`` tokens (``batch_size``, capped by ``max_batch_tokens``)."""
        return max(1, min(self.batch_size, self.max_batch_tokens // seqlen))


class Recipe(_Strict):
    """A complete, versioned quantization recipe."""

    version: Literal[1] = RECIPE_VERSION
    method: Literal["rtn", "gptq"] = "gptq"
    weights: WeightScheme = WeightScheme()
    gptq: GPTQOptions = GPTQOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    activations: ActivationScheme | None = None
    smoothquant: SmoothQuantOptions | None = None
    rotation: RotationOptions | None = None
    kv_cache: KVCacheOptions | None = None
    awq: AWQOptions | None = None
    owq: OWQOptions | None = None
    two_stage: TwoStageOptions = TwoStageOptions()
    leanquant: LeanQuantOptions = LeanQuantOptions()
    blockwise: BlockwiseOptions | None = None
    ignore: tuple[str, ...] = Field(
        ("lm_head",),
        description="regular expressions (re.fullmatch) of Linear names left in full precision",
    )

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.weights.format == "fp8" and self.method != "rtn":
            raise ValueError("fp8 weights are rounded to nearest (method: rtn); GPTQ on an fp8 grid is not implemented "
                             "(per-channel e4m3 weights are already within ~0.1% of full precision)")
        if self.weights.format == "fp8" and (self.awq or self.blockwise):
            raise ValueError("awq and blockwise work on integer grids; fp8 weights need neither (drop them, or use "
                             "weights.format: int)")
        if self.gptq.grid != "scheme" and self.method != "gptq":
            raise ValueError(f"gptq.grid {self.gptq.grid!r} fits grids inside GPTQ and the method is {self.method!r}; "
                             "set method: gptq, or gptq.grid: scheme")
        if self.owq is not None and (self.method != "gptq" or self.gptq.grid == "two_stage" or self.blockwise):
            raise ValueError("owq keeps columns in 16 bits inside GPTQ: it needs method: gptq, and neither gptq.grid "
                             "two_stage nor blockwise (they would refine grids without the kept columns); drop owq or them")
        if self.awq is not None and self.smoothquant is not None:
            raise ValueError("awq and smoothquant both fold per-channel scales into the same norms; keep one of them")
        gptq_without_static_groups = (self.method == "gptq" and self.gptq.act_order and not self.gptq.static_groups
                                      and self.weights.group_size != -1)
        if self.blockwise is not None and self.blockwise.start == "method" and gptq_without_static_groups:
            raise ValueError("blockwise.start 'method' needs contiguous groups and GPTQ act_order without static groups "
                             "permutes them; set gptq.static_groups: true (or gptq.act_order: false, or blockwise.start: rtn)")
        return self

    @property
    def calibrated_steps(self) -> list[str]:
        """The parts of this recipe that read calibration data (for messages: "gptq", "awq", ...)."""
        static_activations = self.activations is not None and not self.activations.dynamic
        steps = [("gptq", self.method != "rtn"), ("awq", self.awq is not None), ("smoothquant", self.smoothquant is not None),
                 ("static activation scales", static_activations), ("blockwise", self.blockwise is not None)]
        return [name for name, used in steps if used]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibrated_steps)

    def updated(self, **changes: object) -> Recipe:
        """A copy with dotted-path overrides, e.g. ``updated(**{"weights.bits": 3})``; None values are ignored."""
        data = self.model_dump()
        for dotted, value in changes.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if node.get(key) is None and key in _OPTIONAL_SECTIONS:
                    node[key] = _OPTIONAL_SECTIONS[key]().model_dump()  # "activations.bits" switches the section on
                node = node[key]
            if leaf not in node:
                raise KeyError(f"unknown recipe field {dotted!r}")
            node[leaf] = value
        return Recipe.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a mapping at the top level")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_OPTIONAL_SECTIONS: dict[str, type[BaseModel]] = {
    "activations": ActivationScheme,
    "smoothquant": SmoothQuantOptions,
    "rotation": RotationOptions,
    "kv_cache": KVCacheOptions,
    "awq": AWQOptions,
    "owq": OWQOptions,
    "blockwise": BlockwiseOptions,
}
