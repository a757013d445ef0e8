"""Which of the loaded model's tensors still hold exactly their checkpoint file's values.

The live model's first merge after a load or a restore used to read model A's whole file only to get values the
model already held: half of a Weight sum's reading. Skipping that read needs proof, not a guess, since a wrong
"A" is a silently wrong model. The proof here:
- the values were known equal to the file's at one moment: the WebUI had just loaded the file itself (not from its
  RAM cache of checkpoints, which may predate the file), or this service had just copied them from the file;
- torch counts the in-place writes to every tensor (`_version`, shared by its detached views): a tensor at the same
  address with the same count has not been written since, by a merge, a LoRA patch, another extension's
  `load_state_dict` or anything else that writes through torch;
- the file is the one noted then (same size, mtime, inode and ctime: `io.read.file_identity`), and the tensor has the
  file's dtype or widens it exactly (fp16 in an fp32 model, the WebUI on a CPU); the WebUI casting an fp32 file to
  fp16 leaves values that are not A's.
Whatever fails one of these is read from the file as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.engine import Source, holds_exactly


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor._version


@dataclass(frozen=True)
class AsLoaded:
    """The moment the loaded model's tensors were known to hold `base`'s values: the file's identity then, and each
    tensor's address and write count then."""

    base: Path
    identity: tuple[int, ...]
    stamps: Mapping[str, tuple[int, int]]

    @classmethod
    def note(cls, base: Path, identity: tuple[int, ...], tensors: Mapping[str, torch.Tensor]) -> AsLoaded:
        return cls(Path(base), identity, {key: _stamp(t) for key, t in tensors.items()})

    def keys_holding(self, source: Source, tensors: Mapping[str, torch.Tensor]) -> frozenset[str]:
        """The keys of `tensors` that hold `source`'s exact values: none unless `source` is the noted file, still
        the same, and then those not written since and holding the file's dtype exactly."""
        path = getattr(source, "path", None)
        if path is None or Path(path).resolve() != self.base.resolve():
            return frozenset()
        if getattr(source, "opened_as", None) != self.identity:
            return frozenset()
        return frozenset(key for key, t in tensors.items()
                         if self.stamps.get(key) == _stamp(t) and key in source
                         and holds_exactly(source.dtype(key), t.dtype))
