"""How a merge feeds a compute device (a GPU): each key's inputs are read from disk into page-locked (pinned) host
buffers, copied to the device asynchronously, and computed there in fp32.

An asynchronous copy reads its host buffer after the call returns, so a buffer may be refilled only once the copies
out of it have finished: every worker's buffers carry the mark of their last copies, and `wait` blocks on it before
the next read. On the CPU (tests, a machine without a GPU) the same path runs with ordinary buffers and no marks.
"""

from __future__ import annotations

import torch


class DeviceLink:
    """The transfers of one merge to `device`. Tests substitute a recording subclass (no GPU is needed for that)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        #: host buffers are page-locked only for a CUDA device (pinning needs the CUDA driver, and is what lets a
        #: copy run asynchronously)
        self.pinned = self.device.type == "cuda"

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device; from pinned memory the copy is asynchronous (call `mark` after the uploads)."""
        return tensor.to(self.device, non_blocking=True)

    def mark(self) -> object | None:
        """A mark of the copies issued so far on the current stream (None where copies are synchronous)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, mark: object | None) -> None:
        """Block until the copies of `mark` have read their host buffers."""
        if mark is not None:
            mark.synchronize()

    def finish(self) -> None:
        """Block until everything issued on the device is done (the merge is then in the destination tensors)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def device_link(device: DeviceLink | torch.device | str | None) -> DeviceLink | None:
    if device is None or isinstance(device, DeviceLink):
        return device
    return DeviceLink(device)
