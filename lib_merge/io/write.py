"""Writing checkpoints safely: atomic replacement, refusal to clobber inputs, and streamed safetensors output.

A crash, Ctrl-C or a full disk must never leave a half-written file under the final name, and an input model
must never be overwritten, so every write goes to a hidden temporary file in the target folder that is fsync'd
and renamed only on success. The stream writer knows the whole header up front, so the merge engine can write
each tensor, in any order, as soon as it is computed.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .format import CheckpointError, encode_header, itemsize
from .metadata import check_name_encoding

SAVE_EXTS = (".safetensors", ".ckpt")

log = logging.getLogger(__name__)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path (symlinks, `..`; also for a file not yet created) or
    the same device and inode (a hardlink, another mount of the folder)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


class OutputExists(CheckpointError):
    """The output file exists and overwriting was not asked for (the CLI's wording; the tab words it its own way)."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def _check_target(path: Path, overwrite: bool) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointError(f"Output folder {parent} does not exist; create it or choose another folder.")
    if path.is_dir():
        raise CheckpointError(f"Output {path} is a folder; choose a file name.")
    if path.exists() and not overwrite:
        raise OutputExists(path, f"Output file {path} exists; pass --overwrite or choose another name.")


def check_output_path(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], overwrite: bool
) -> Path:
    """Refuse an output that is an input (even with overwrite; every file the merge reads, by any path), sits in a
    missing folder, or exists unasked."""
    path = Path(path)
    for inp in inputs:
        if inp is not None and same_file(path, Path(inp)):
            raise CheckpointError(
                f"Output {path} is {inp}, a file this merge reads; an input is never overwritten. Choose another name."
            )
    _check_target(path, overwrite)
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not possible (or needed) on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")
ORPHAN_AGE = 600  # seconds a temporary file lies untouched before its writer can be taken for gone


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the temporary files that writers ended without cleaning up left in `folder`, and return them.

    A process can end without running any clean-up: the WebUI exits on SIGTERM or Ctrl+C (os._exit), a merge
    thread dies with its process, the machine loses power. Its temporary file (named with its PID) is removed by
    the next save into the same folder, when that PID no longer runs and the file has not changed for ten minutes
    (a writer in another PID namespace sharing the folder keeps writing, so its file stays recent)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or int(match[1]) == os.getpid() or _process_runs(int(match[1])):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and time.time() - entry.stat().st_mtime > ORPHAN_AGE:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.warning("Block Merger: removed %s, left by a save that was killed", entry.path)
        except OSError:
            continue
    return removed


def _process_runs(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: never taken for gone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


@contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it becomes `path`, on any exception it is removed."""
    path = Path(path)
    check_name_encoding(path, "output")
    _check_target(path, overwrite)
    remove_orphans(path.parent)
    # Keep the temporary name within the usual 255-byte limit even for a 250-character target name.
    stem = path.name.encode("utf-8")[:200].decode("utf-8", "ignore")
    tmp = path.parent / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if not tmp.is_file():
            raise CheckpointError(f"Nothing was written for {path}; the output was not created.")
        _fsync_file(tmp)
        if not overwrite and path.exists():
            raise OutputExists(path, f"Output file {path} appeared while saving; pass --overwrite or choose another "
                                     f"name.")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            raise write_failed(path, e.strerror) from None
        raise


@contextmanager
def reporting_no_room(path: Path) -> Iterator[None]:
    """Writes into the temporary file of output `path`: a full disk or a file-size limit becomes write_failed."""
    try:
        yield
    except OSError as e:
        if e.errno in _NO_ROOM:
            raise write_failed(path, e.strerror) from None
        raise


#: A write that failed for lack of room: a full disk, a quota, a file-size limit (ulimit -f; SIGXFSZ is ignored by
#: Python, so the write fails with EFBIG instead of killing the process).
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_failed(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"Could not write {path}: {reason}. Nothing was saved; free disk space (or raise the "
                           "file-size limit) and try again.")


def save_pickle(obj: object, tmp: Path, path: Path) -> None:
    """`torch.save(obj, tmp)` for the output `path`; a failed write is a CheckpointError (torch raises it as a
    RuntimeError that names only the archive member it was writing)."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise write_failed(path, f"the disk refused the data ({reason})") from None


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor; the header (every key's place) is fixed at construction.

    Each tensor goes straight to its own offset, so tensors may arrive in any order and from several threads
    at once (the merge engine's workers write as they finish), and only the tensors being written are in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self._entries = {k: (d, tuple(int(x) for x in s)) for k, d, s in entries}
        if len(self._entries) != len(entries):
            raise ValueError("a tensor is listed twice")
        header, offsets = encode_header([(k, d, s) for k, (d, s) in self._entries.items()], metadata)
        self._offsets = {k: len(header) + begin for k, (begin, _) in zip(self._entries, offsets, strict=True)}
        self._size = len(header) + (offsets[-1][1] if offsets else 0)
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        try:
            _pwrite_all(self._fd, memoryview(header), 0)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def pending(self) -> list[str]:
        """Keys still to be written, in header order."""
        return [k for k in self._entries if k not in self._written]

    def _claim(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Check that `key` is declared with this dtype and shape and not written yet, and mark it written."""
        if self._closed:
            raise CheckpointError(f"{self.path} is already closed; cannot write {key!r}.")
        if key not in self._entries:
            raise ValueError(f"{key!r} was not declared in the header of {self.path}.")
        want_dtype, want_shape = self._entries[key]
        if dtype != want_dtype:
            raise ValueError(f"{key!r}: header says {want_dtype}, tensor is {dtype}")
        if tuple(shape) != want_shape:
            raise ValueError(f"{key!r}: header says shape {list(want_shape)}, tensor is {list(shape)}")
        with self._lock:
            if key in self._written:
                raise ValueError(f"{key!r} was already written to {self.path}.")
            self._written.add(key)

    def copy(self, key: str, dtype: torch.dtype, shape: Sequence[int], fd: int, offset: int) -> None:
        """Write `key` from the bytes another file holds at `offset` of `fd` (a tensor kept exactly as stored):
        the kernel copies them where it can (Linux's copy_file_range), without passing them through this process's
        memory."""
        self._claim(key, dtype, shape)
        nbytes = itemsize(dtype) * math.prod(shape)
        done = 0
        while done < nbytes:
            try:
                n = os.copy_file_range(fd, self._fd, nbytes - done, offset + done, self._offsets[key] + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = 0
            if n == 0:
                break  # not supported between these files (or the source ended): copy the rest by hand
            done += n
        while done < nbytes:
            chunk = os.pread(fd, min(nbytes - done, 1 << 24), offset + done)
            if not chunk:
                raise CheckpointError(f"the source of {key!r} ended early while it was copied to {self.path}.")
            _pwrite_all(self._fd, memoryview(chunk), self._offsets[key] + done)
            done += len(chunk)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._claim(key, tensor.dtype, tensor.shape)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if t.numel():
            _pwrite_all(self._fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), self._offsets[key])

    def close(self) -> None:
        """Finish the file; raises if any declared tensor was not written."""
        if self._closed:
            return
        self._closed = True
        try:
            missing = self.pending
            if missing:
                raise CheckpointError(
                    f"{self.path} is incomplete: {len(missing)} of {len(self._entries)} tensors were not written "
                    f"(first missing: {missing[0]!r})."
                )
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        """Close the file without checks (the caller discards it)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Positional write of all of `data` (short writes retried); ENOSPC and other errors propagate as OSError."""
    pwrite = getattr(os, "pwrite", None)
    done = 0
    while done < len(data):
        if pwrite is not None:
            n = pwrite(fd, data[done:], offset + done)
        else:  # Windows has no pwrite; callers there write from one thread
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.write(fd, data[done:])
        done += n


def _check_state(state: Mapping[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entries must be str -> Tensor, got {k!r}: {type(v).__name__}")


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a whole state dict atomically: .safetensors (with metadata) or .ckpt (a plain dict, no metadata)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SAVE_EXTS:
        raise CheckpointError(f"Cannot save {path}: the name must end in .safetensors or .ckpt.")
    _check_state(state)
    with atomic_output(path, overwrite) as tmp:
        if ext == ".safetensors":
            entries = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
            with SafetensorsStreamWriter(tmp, entries, metadata) as w:
                for k, v in state.items():
                    w.write(k, v)
        else:
            plain = {}
            for k, v in state.items():
                t = v.detach().to("cpu").contiguous()
                if t.untyped_storage().nbytes() != t.nbytes:  # a view would drag its whole storage along
                    t = t.clone()
                plain[k] = t
            save_pickle(plain, tmp, path)
    return path
