"""Finite results: a merge never writes inf/NaN that its inputs did not hold.

A ratio far outside [0, 1] (alpha 1e30) overflows the output dtype, and such a model used to be written silently.
The engine checks each piece right after computing it, while it is still in the CPU cache (`all_finite`: one pass
per piece); only a non-finite piece looks closer, at its inputs, to tell a merge that overflowed (an error) from an
input model that already held inf/NaN (a warning).
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
    """Whether every value of a float tensor is finite, exactly, with reductions only (no temporary the size of the
    tensor: a merge checks thousands of pieces, and freed piece-sized temporaries left ~0.1 GB in the workers' malloc
    arenas) that are fast on every torch the WebUIs ship. 16-bit floats: minimum and maximum (NaN propagates through
    both); their sum is 40x a lerp of the same piece on the WebUI's torch 2.1 and aminmax has no fp16 kernel there.
    fp32/fp64: one sum first (a finite sum proves every element finite; large finite values may overflow it, so only
    then minimum and maximum decide). fp8 is widened to fp16 first (which holds every fp8 value, inf and NaN)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:
        tensor = tensor.to(torch.float16)
    if tensor.dtype.itemsize >= 4 and math.isfinite(tensor.sum().item()):
        return True
    return math.isfinite(tensor.min().item()) and math.isfinite(tensor.max().item())


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
