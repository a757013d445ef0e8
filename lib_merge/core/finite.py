"""Finite results: a merge never writes inf/NaN that its inputs did not hold.

A ratio far outside [0, 1] (alpha 1e30) overflows the output dtype, and such a model used to be written silently.
The engine checks each piece right after computing it, while it is still in the CPU cache: one sum per piece (a
finite sum means every element is finite); only a non-finite sum looks closer (minimum and maximum), at the piece
and at its inputs, to tell a merge that overflowed (an error) from an input model that already held inf/NaN (a
warning).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence

import torch

from .errors import MergeError

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class NonFiniteWarning(UserWarning):
    """An input model already holds inf/NaN in a key (the merge passes them on, or took other values there)."""


def all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:  # fp8 has no sum or aminmax; fp16 holds every fp8 value, inf and NaN exactly
        tensor = tensor.to(torch.float16)
    if math.isfinite(tensor.sum().item()):  # in the tensor's own dtype: the fastest pass (fp16 sums in fp32 inside)
        return True
    low, high = torch.aminmax(tensor)  # exact (NaN propagates): the sum alone may overflow for large finite values
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class FiniteCheck:
    """One merge's check: raises for a key the merge made non-finite, warns once per input model holding inf/NaN."""

    def __init__(self):
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, key: str, result: torch.Tensor, inputs: Sequence[tuple[str, torch.Tensor | None]],
                 ratio: str) -> bool:
        """`inputs`: (which model, the values `result` was computed from); `ratio` says what the key was merged with.
        True when `result` is finite; False after warning about inputs that hold inf/NaN."""
        if all_finite(result):
            return True
        if not self.inputs(key, inputs, "the merge passes them on"):
            raise MergeError(f"Merging {key} with {ratio} gives inf/NaN, although the models hold finite values "
                             f"there: the result overflows its dtype ({DTYPE_NAMES.get(result.dtype, result.dtype)}). "
                             "Nothing was saved or loaded; use smaller ratios.")
        return False

    def inputs(self, key: str, inputs: Sequence[tuple[str, torch.Tensor | None]],
               effect: str = "this merge did not take them here") -> bool:
        """Warn (once per model) about the inputs that hold inf/NaN in `key`; True when any does. A finite result
        does not prove finite inputs where the formula takes some values and leaves others (a tensor swap, DARE's
        drops): the engine asks here then too, so a broken model is named even when this merge hid its damage."""
        holding = [model for model, tensor in inputs if tensor is not None and not all_finite(tensor)]
        for model in holding:
            with self._lock:
                if model in self._warned:
                    continue
                self._warned.add(model)
            warnings.warn(f"{model} already holds inf/NaN in {key} ({effect}); "
                          "further keys of this model are not listed. Check that model.", NonFiniteWarning,
                          stacklevel=3)
        return bool(holding)
