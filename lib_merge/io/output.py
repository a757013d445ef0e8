"""Streaming a merge straight into a checkpoint file, with the save options applied key by key."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .checkpoint import (
    CLIP_POSITION_ID_KEYS,
    SafetensorsStreamWriter,
    SaveOptions,
    atomic_output,
    finalize_tensor,
    is_kept,
    plan_output,
    precision_warnings,
)
from .checkpoint import Checkpoint as Source
from .write import reporting_no_room, save_pickle


class FileSink:
    """An engine sink that writes the output file as keys arrive (safetensors) or at the end (.ckpt).

    A safetensors output holds no more than the tensors being computed: each goes straight to its place in the
    file. The file appears under its final name only when complete (atomic rename); an abort removes it.
    """

    def __init__(self, path: str | Path, options: SaveOptions, metadata: dict[str, str] | None, is_sdxl: bool,
                 overwrite: bool = False, vae: Source | None = None):
        self.path, self.options, self.metadata = Path(path), options, metadata or {}
        self.is_sdxl, self.overwrite, self.vae = is_sdxl, overwrite, vae
        self._stack: contextlib.ExitStack | None = None
        self._writer: SafetensorsStreamWriter | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._tmp: Path | None = None
        self._converted: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.warnings: list[str] = []

    def begin(self, entries) -> None:
        planned = plan_output(entries, self.is_sdxl, self.options, self.vae)
        self.warnings = precision_warnings(planned)
        given = {key: dtype for key, dtype, _ in entries}
        self._converted = {key: (dtype, shape) for key, dtype, shape in planned
                           if dtype.is_floating_point and given[key] != dtype}
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_output(self.path, self.overwrite))
        if self.path.suffix.lower() == ".safetensors":
            self._writer = SafetensorsStreamWriter(self._tmp, planned, self.metadata)
        else:
            self._state = {}

    def target(self, key: str) -> torch.Tensor | None:
        """A key saved in another dtype is computed straight into a tensor of that dtype (its fp32 result rounded
        once, e.g. fp8 inputs saved as bf16); the others go through the engine's own buffers, which put() writes
        out before they are reused."""
        converted = self._converted.get(key)
        return None if converted is None else torch.empty(converted[1], dtype=converted[0])

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if not is_kept(key, self.is_sdxl, self.options):
            return
        tensor = finalize_tensor(key, tensor, self.options, self.vae)
        if self._writer is not None:
            with reporting_no_room(self.path):
                self._writer.write(key, tensor)
        else:
            self._state[key] = tensor.clone()

    def put_unchanged(self, key: str, source: Source) -> None:
        """`key` exactly as `source` stores it: copied file to file by the kernel where the save options leave it
        as it is (a safetensors output, no dtype change, no VAE, no reset position ids), else read and put()."""
        stored_at = getattr(source, "stored_at", None)
        as_is = (self._writer is not None and stored_at is not None and hasattr(os, "copy_file_range")
                 and self.vae is None and not (self.options.reset_clip_ids and key in CLIP_POSITION_ID_KEYS)
                 and key not in self._converted)
        if not is_kept(key, self.is_sdxl, self.options):
            return
        if not as_is:
            self.put(key, source.get(key))
            return
        with reporting_no_room(self.path):
            self._writer.copy(key, source.dtype(key), source.shape(key), *stored_at(key))

    def finish(self) -> Path:
        if self._writer is not None:
            with reporting_no_room(self.path):
                self._writer.close()
        else:
            save_pickle(self._state, self._tmp, self.path)
            self._state = None
        self._stack.close()
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._state = None
        if self._stack is not None:
            # Leaving atomic_output with an exception removes the temporary file.
            self._stack.__exit__(MergeAborted, MergeAborted(), None)
            self._stack = None


class MergeAborted(Exception):
    """Raised into atomic_output so it discards the temporary file."""
