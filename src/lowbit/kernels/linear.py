"""Quantized ``nn.Linear`` replacements that hold packed weights and call the Triton kernels.

Each module runs the Triton kernel when it can (Triton importable and the input on a CUDA
device, or ``TRITON_INTERPRET=1``) and plain PyTorch otherwise, so a model loads and runs everywhere:
on the CPU, torch's own int4 and int8 kernels where they take the product (:mod:`lowbit.kernels.cpu`),
else the dense reference of :mod:`lowbit.kernels.reference`.

>>> import torch
>>> from lowbit.kernels.linear import WeightOnly, swap_linears
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
>>> model = swap_linears(model, WeightOnly(bits=4, group_size=128))
>>> type(model[0]).__name__
'WNA16Linear'
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels import cpu, reference
from lowbit.kernels.layout import PackedWNA16, pack_wna16

logger = logging.getLogger(__name__)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_WARNED: set[tuple[int, str]] = set()  # (bits, CPU fallback reason) already logged


def kernels_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not _HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return device.type == "cuda"


# The kernels as PyTorch custom ops: torch.compile treats them as opaque calls (it cannot trace
# into a Triton launcher that tunes and caches launch configurations in Python) and fuses the
# elementwise work around them.
@torch.library.custom_op(
    "lowbit::wna16_mm",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int bits, int group_size, "
    "int in_features, int out_features, Tensor? next_codes=None, Tensor? next_scales=None) -> Tensor",
)
def _wna16_mm(x, qweight, scale, zero, bits, group_size, in_features, out_features, next_codes=None, next_scales=None):
    from lowbit.kernels.w4a16 import wna16_matmul

    packed = PackedWNA16(qweight, scale, zero, bits, group_size, in_features, out_features)
    return wna16_matmul(x, packed, l2_next=_present(next_codes, next_scales))


@_wna16_mm.register_fake
def _(x, qweight, scale, zero, bits, group_size, in_features, out_features, next_codes=None, next_scales=None):
    return x.new_empty((*x.shape[:-1], out_features))


def _present(*tensors: Tensor | None) -> list[Tensor]:
    return [t for t in tensors if t is not None]


@torch.library.custom_op(
    "lowbit::wna16_mm_fused",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int bits, int group_size, "
    "int in_features, int out_features, Tensor? norm, float eps, bool swiglu, Tensor? residual, "
    "Tensor? next_codes=None, Tensor? next_scales=None, bool glu=False) -> Tensor",
)
def _wna16_mm_fused(x, qweight, scale, zero, bits, group_size, in_features, out_features, norm, eps, swiglu, residual,
                    next_codes=None, next_scales=None, glu=False):  # fmt: skip
    from lowbit.kernels.w4a16 import Fusion, wna16_matmul

    packed = PackedWNA16(qweight, scale, zero, bits, group_size, in_features, out_features)
    fusion = Fusion(norm, eps, swiglu, residual, glu)
    return wna16_matmul(x, packed, fusion=fusion, l2_next=_present(next_codes, next_scales))


@_wna16_mm_fused.register_fake
def _(x, qweight, scale, zero, bits, group_size, in_features, out_features, norm, eps, swiglu, residual,
      next_codes=None, next_scales=None, glu=False):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features // 2 if glu else out_features))


@torch.library.custom_op(
    "lowbit::w8a8_mm", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor weight_scale) -> Tensor"
)
def _w8a8_mm(x, weight, weight_scale):
    from lowbit.kernels.w8a8 import w8a8_linear

    return w8a8_linear(x, weight, weight_scale)


@_w8a8_mm.register_fake
def _(x, weight, weight_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@dataclass(frozen=True)
class WeightOnly:
    """W{4,8}A16: group-wise integer weights, 16-bit activations (GPTQ / AWQ style)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True


@dataclass(frozen=True)
class Int8Dynamic:
    """W8A8 int8: per-channel weight scales, dynamic per-token activation scales (SmoothQuant)."""


@dataclass(frozen=True)
class Fp8Dynamic:
    """W8A8 FP8 e4m3: per-channel weight scales, dynamic per-token activation scales."""


KernelScheme = WeightOnly | Int8Dynamic | Fp8Dynamic


class WNA16Linear(nn.Module):
    """Linear layer with packed 4- or 8-bit group-wise weights (layout of :mod:`lowbit.kernels.layout`).

    ``input_permutation`` (optional) reorders input features first: act-order checkpoints whose
    groups are not contiguous are stored with their columns sorted by group.
    """

    def __init__(
        self, packed: PackedWNA16, bias: Tensor | None = None, input_permutation: Tensor | None = None
    ):
        super().__init__()
        self.bits = packed.bits
        self.group_size = packed.group_size
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero", packed.zero)
        self.register_buffer("bias", bias)
        self.register_buffer("input_permutation", input_permutation)
        # the next projection's weights, prefetched into the L2 after this product (lowbit.kernels.prefetch;
        # set by runtime.Decoder.link_prefetch; plain attributes, not buffers: they belong to that module)
        self.l2_next: list[Tensor] = []
        # the weight in torch's CPU int4 kernel's layout, made on the first CPU call (see _int4_cpu)
        self._cpu_int4: tuple[tuple, cpu.CpuInt4Weight] | None = None

    @property
    def packed(self) -> PackedWNA16:
        return PackedWNA16(
            self.qweight,
            self.scale,
            self.zero,
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: WeightOnly) -> WNA16Linear:
        """Round-to-nearest quantization of a float ``nn.Linear`` (benchmarks, tests, random models)."""
        q, scale, zero = reference.quantize_weight_groupwise(
            linear.weight.data, scheme.bits, scheme.group_size, scheme.symmetric
        )
        bias = None if linear.bias is None else linear.bias.data
        return cls(pack_wna16(q, scale, zero, scheme.bits, scheme.group_size), bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_permutation is not None:
            x = x[..., self.input_permutation]
        if kernels_available(x.device):
            y = torch.ops.lowbit.wna16_mm(
                x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                self.in_features, self.out_features, *self.l2_next[:2],
            )  # fmt: skip
        else:
            # inside torch.compile the conversion made by an eager call (the prefill) is used as it is: checking the
            # buffers' pointers would break the graph at every projection
            cached = self._cpu_int4
            compiling = torch.compiler.is_compiling() and cached is not None and cached[0][0] == x.dtype
            int4 = cached[1] if compiling else self._int4_cpu(x)
            y = cpu.wna16_matmul_cpu(x, self.packed, int4)
        return y if self.bias is None else y + self.bias

    def _int4_cpu(self, x: Tensor) -> cpu.CpuInt4Weight | None:
        """The weight in the layout of torch's CPU int4 kernel for ``x``'s dtype, converted on first use and kept (a
        second copy of the codes and scales, about as large as the packed weight), or ``None`` where that kernel
        cannot run (said once per reason: the dequantizing path is far slower). Rebuilt after ``load_state_dict``,
        ``.to()`` and in-place changes of the buffers; not after writes through ``.data`` (which torch does not
        count): call ``drop_cpu_conversion()`` after those."""
        refusal = cpu.int4_cpu_refusal(self.packed, x)
        if refusal is not None:
            if x.device.type == "cpu" and (self.bits, refusal) not in _WARNED:
                _WARNED.add((self.bits, refusal))
                logger.warning("W%dA16 on the CPU dequantizes its weights on every call (slow): %s", self.bits, refusal)
            return None
        # inference tensors have no version counter: their in-place changes (made in inference mode) go unseen
        buffers = (t for t in (self.qweight, self.scale, self.zero) if t is not None)
        key = (x.dtype, *((t.data_ptr(), None if t.is_inference() else t._version) for t in buffers))
        if self._cpu_int4 is None or self._cpu_int4[0] != key:
            self._cpu_int4 = (key, cpu.prepare_int4_cpu(self.packed, x.dtype))
        return self._cpu_int4[1]

    def drop_cpu_conversion(self) -> None:
        """Forget the CPU kernel's copy of the weight (made again on the next CPU call)."""
        self._cpu_int4 = None

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the copy no longer matches the buffers
        self.drop_cpu_conversion()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # a compiled graph uses the copy without checking it
        self.drop_cpu_conversion()
        super()._load_from_state_dict(*args, **kwargs)

    def fused(
        self,
        x: Tensor,
        norm: Tensor | None = None,
        eps: float = 1e-6,
        swiglu: bool = False,
        residual: Tensor | None = None,
        glu: bool = False,
    ) -> Tensor:
        """``forward`` with a decode step's elementwise work around it (:class:`lowbit.kernels.w4a16.Fusion`):
        ``rms_norm(x, norm, eps)`` first, or ``silu(gate) * up`` of ``x = [gate, up]``; ``silu(gate) * up`` of the
        output ``[gate, up]`` with ``glu``; ``+ residual`` after. One launch of the 4-bit GEMV at up to 8 rows on
        CUDA where a kernel takes it; separate operations elsewhere."""
        if kernels_available(x.device) and self.input_permutation is None and self.bias is None:
            return torch.ops.lowbit.wna16_mm_fused(
                x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                self.in_features, self.out_features, norm, eps, swiglu, residual, *self.l2_next[:2], glu=glu,
            )  # fmt: skip
        if norm is not None:
            x = F.rms_norm(x, (self.in_features,), norm, eps)
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        y = self(x)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y if residual is None else (y + residual).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
        )


class W8A8Linear(nn.Module):
    """Linear layer with int8 or fp8-e4m3 weights and dynamic per-token activation quantization."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.dtype not in (torch.int8, torch.float8_e4m3fn):
            raise ValueError(f"W8A8Linear takes int8 or float8_e4m3fn weights, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Int8Dynamic | Fp8Dynamic) -> W8A8Linear:
        dtype = torch.int8 if isinstance(scheme, Int8Dynamic) else torch.float8_e4m3fn
        wq, scale = reference.quantize_per_channel(linear.weight.data, dtype)
        bias = None if linear.bias is None else linear.bias.data
        return cls(wq, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        if kernels_available(x.device):
            y = torch.ops.lowbit.w8a8_mm(x, self.weight, self.weight_scale)
        elif x.device.type == "cpu" and self.weight.dtype == torch.int8:
            y = cpu.w8a8_int8_mm_cpu(x, self.weight, self.weight_scale)
        else:
            y = reference.w8a8_matmul_reference(
                x.reshape(-1, self.in_features), self.weight, self.weight_scale
            )
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}"


def concat_outputs(modules: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in modules], -1)`` (e.g. fused q/k/v), or ``None``.

    Fusing projections that read the same input turns several small launches into one larger,
    more bandwidth-efficient one. Only modules of one kind and scheme can be fused.
    """
    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        return None
    biases = [getattr(m, "bias", None) for m in modules]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)
    if isinstance(first, nn.Linear):
        fused = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=bias is not None)
        fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
        fused.weight.data = torch.cat([m.weight.data for m in modules])
        if bias is not None:
            fused.bias.data = bias
        return fused
    if isinstance(first, WNA16Linear):
        same = all(
            (m.bits, m.group_size, m.zero is None, m.input_permutation is None)
            == (first.bits, first.group_size, first.zero is None, True)
            for m in modules
        )
        if not same:
            return None
        packed = PackedWNA16(
            qweight=torch.cat([m.qweight for m in modules], dim=1),
            scale=torch.cat([m.scale for m in modules], dim=1),
            zero=None if first.zero is None else torch.cat([m.zero for m in modules], dim=1),
            bits=first.bits,
            group_size=first.group_size,
            in_features=first.in_features,
            out_features=sum(m.out_features for m in modules),
        )
        return WNA16Linear(packed, bias)
    if isinstance(first, W8A8Linear) and all(m.weight.dtype == first.weight.dtype for m in modules):
        weight = torch.cat([m.weight for m in modules])
        return W8A8Linear(weight, torch.cat([m.weight_scale for m in modules]), bias)
    return None


def quantized_linear(linear: nn.Linear, scheme: KernelScheme) -> nn.Module:
    """The quantized replacement of one ``nn.Linear`` for ``scheme``."""
    if isinstance(scheme, WeightOnly):
        return WNA16Linear.from_linear(linear, scheme)
    if isinstance(scheme, Int8Dynamic | Fp8Dynamic):
        return W8A8Linear.from_linear(linear, scheme)
    raise TypeError(f"unknown kernel scheme {scheme!r}; use WeightOnly, Int8Dynamic or Fp8Dynamic")


def swap_linears(
    model: nn.Module,
    scheme: KernelScheme,
    skip: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its quantized module.

    Args:
        model: any module tree.
        scheme: :class:`WeightOnly`, :class:`Int8Dynamic` or :class:`Fp8Dynamic`.
        skip: ``skip(name, linear) -> True`` keeps that linear in floating point (e.g. ``lm_head``).

    Linears whose ``in_features`` the group size does not divide are an error, not a silent skip.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (skip is not None and skip(name, module))
    ]
    for name, linear in targets:
        if (
            isinstance(scheme, WeightOnly)
            and scheme.group_size != -1
            and linear.in_features % scheme.group_size
        ):
            raise ValueError(
                f"group_size {scheme.group_size} does not divide in_features {linear.in_features} of {name}; "
                "use a divisor, -1 (per-channel), or skip this layer"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_linear(linear, scheme))
    logger.info("replaced %d linears with %s modules", len(targets), type(scheme).__name__)
    return model
