"""OWQ weights (Lee et al., AAAI 2024, https://arxiv.org/abs/2306.02272) in memory and in checkpoints.

An OWQ linear is a normal low-bit matrix plus ``k`` input columns kept in 16 bits. In memory it is an
:class:`OWQWeight`; in a checkpoint ("lowbit-owq/1") it is

* the usual compressed-tensors ``pack-quantized`` tensors of the low-bit matrix, whose codes at the kept columns
  sit at the zero point (they dequantize to exactly 0: OWQ quantizes the other columns with those set to 0);
* ``<linear>.owq_kept_weight``: ``[out, k]`` float16 (or bfloat16) values of the kept columns;
* ``<linear>.owq_kept_index``: ``[k]`` int32, the sorted input-column indices.

The served function is ``y = dequant(Q) x + V x[K]`` (``lowbit.algorithms.owq.owq_matmul``), which equals a
dense layer whose columns K are overwritten by V. ``lowbit.load`` does that overwrite after transformers has
dequantized the low-bit matrix. Plain transformers (and any compressed-tensors loader) ignores the two extra
tensors and runs the low-bit matrix alone, i.e. with the kept input channels contributing nothing: the model
runs, but less accurately than the reported figures. A runtime without a hook for the extra term has to be
given a dense (16-bit) copy of the weight with the columns put back: no low-bit grid can hold them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.formats.integer import QuantizedWeight

FORMAT = "lowbit-owq/1"
KEPT_WEIGHT = "owq_kept_weight"
KEPT_INDEX = "owq_kept_index"


@dataclass(frozen=True)
class OWQWeight(QuantizedWeight):
    """A :class:`QuantizedWeight` whose codes are zero at ``kept_indices`` ``[k]`` (int64, sorted) plus the
    ``kept_columns`` ``[out, k]`` (in their storage dtype) that replace those columns."""

    kept_columns: Tensor | None = None
    kept_indices: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        dense = super().dequantize(torch.float32)
        if self.kept_indices is not None and self.kept_indices.numel():
            dense[:, self.kept_indices] = self.kept_columns.float()
        return dense.to(dtype)

    def map(self, function: Callable[[Tensor], Tensor]) -> OWQWeight:
        base = super().map(function)
        return OWQWeight(**{name: getattr(base, name) for name in QuantizedWeight.__dataclass_fields__},
                         kept_columns=None if self.kept_columns is None else function(self.kept_columns),
                         kept_indices=None if self.kept_indices is None else function(self.kept_indices))

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The extra safetensors entries (without the module prefix)."""
        assert self.kept_columns is not None and self.kept_indices is not None
        return {KEPT_WEIGHT: self.kept_columns.contiguous(), KEPT_INDEX: self.kept_indices.to(torch.int32)}


def manifest_entry(kept_dtype: str) -> dict:
    """What the manifest records about OWQ tensors (``"owq"``), so a reader knows what the extra tensors are."""
    return {"format": FORMAT, "kept_weight": f"<linear>.{KEPT_WEIGHT} [out, k] {kept_dtype}",
            "kept_index": f"<linear>.{KEPT_INDEX} [k] int32, sorted input columns",
            "serve": "y = dequant(Q) x + kept_weight @ x[kept_index]; Q is 0 at the kept columns. lowbit.load "
                     "applies it; plain transformers ignores the two tensors and runs Q alone"}


def kept_column_tensors(keys: Iterable[str], read: Callable[[str], Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{linear name: (kept_weight, kept_index)}`` from checkpoint keys and a reader of one tensor by key."""
    suffix = "." + KEPT_WEIGHT
    return {key[: -len(suffix)]: (read(key), read(key[: -len(suffix)] + "." + KEPT_INDEX))
            for key in keys if key.endswith(suffix)}


@torch.no_grad()
def install_kept_columns(root: nn.Module, kept: dict[str, tuple[Tensor, Tensor]]) -> int:
    """Overwrite the kept columns of the (dequantized) linears under ``root``; returns how many linears."""
    from lowbit.models.arch import linear_weight

    for name, (values, index) in kept.items():
        weight = linear_weight(root.get_submodule(name))
        if weight.shape[0] != values.shape[0]:
            raise ValueError(f"{name}: the checkpoint's kept columns are [{values.shape[0]}, k] and the weight has "
                             f"{weight.shape[0]} rows; this is not the checkpoint of this model")
        weight[:, index.long().to(weight.device)] = values.to(weight.device, weight.dtype)
    return len(kept)


def restore_kept_columns(model: nn.Module, folder) -> int:
    """Read every ``owq_kept_*`` tensor of a checkpoint folder into ``model`` (after transformers dequantized it)."""
    from pathlib import Path

    from safetensors import safe_open

    count = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            count += install_kept_columns(model, kept_column_tensors(handle.keys(), handle.get_tensor))
    return count
