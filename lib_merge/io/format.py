"""The safetensors file format, parsed and written by hand, and the error type for bad checkpoint files.

We parse the header ourselves (instead of trusting a library's mmap) so that tensors can be read with positional
reads into fresh buffers, and so that every way a file can be broken gets a message naming the file. The checks
mirror what the safetensors library itself enforces, so a file we accept is one it accepts too.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import untrusted_json
from ..core.errors import MergeError


class CheckpointError(MergeError):
    """A checkpoint file that cannot be read or written; the message names the file and says what to do."""


# safetensors dtype name <-> torch dtype. Only these are read or written.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}


_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in ST_TO_TORCH.values()}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element (`torch.dtype.itemsize` is missing from the older torch some WebUI installs ship)."""
    size = _ITEMSIZE.get(dtype)
    return size if size is not None else torch.empty((), dtype=dtype).element_size()


# The safetensors library refuses headers above 100 MB; a real SDXL header is about 200 KB.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file: absolute byte range plus dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]  # in file (data offset) order
    metadata: dict[str, str]
    data_start: int


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {what}. "
        "The file is corrupt or was not fully downloaded; download or convert it again."
    )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: Path, head: bytes, file_size: int, read_json: bytes | None = None) -> SafetensorsHeader:
    """Validate a safetensors header. `head` is the first 8 bytes, `read_json` the header bytes that followed."""
    if file_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); download or save it again.")
    if file_size < 8 or len(head) < 8:
        raise CheckpointError(
            f"{path} is truncated: {file_size} bytes is too short for a safetensors file; download it again."
        )
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise _corrupt(path, f"the header length field says {n} bytes")
    if 8 + n > file_size:
        raise CheckpointError(
            f"{path} is truncated: its header says {n} bytes but the file has only {file_size - 8} after the "
            "length field; download it again."
        )
    if read_json is None or len(read_json) != n:
        raise CheckpointError(f"{path} is truncated: the header could not be read completely; download it again.")
    try:
        raw = untrusted_json.loads(read_json.decode("utf-8"), MAX_HEADER_BYTES, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _corrupt(path, "the header is not a JSON object")

    metadata: dict[str, str] = {}
    meta = raw.pop(METADATA_KEY, None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _corrupt(path, "__metadata__ must map strings to strings")
        metadata = dict(meta)

    data_start = 8 + n
    data_size = file_size - data_start
    spans: list[tuple[int, int, str]] = []
    parsed: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for key, info in raw.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"entry {key!r} is not an object")
        st_dtype = info.get("dtype")
        if st_dtype not in ST_TO_TORCH:
            raise _corrupt(path, f"tensor {key!r} has unsupported dtype {st_dtype!r}")
        dtype = ST_TO_TORCH[st_dtype]
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {key!r} has an invalid shape {shape!r}")
        offs = info.get("data_offsets")
        valid = isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
        if not valid or not 0 <= offs[0] <= offs[1]:
            raise _corrupt(path, f"tensor {key!r} has invalid data_offsets {offs!r}")
        expected = math.prod(shape) * itemsize(dtype)
        if offs[1] - offs[0] != expected:
            raise _corrupt(
                path, f"tensor {key!r} has {offs[1] - offs[0]} bytes of data but its shape {shape} needs {expected}"
            )
        parsed[key] = (dtype, tuple(shape), offs[0], offs[1])
        spans.append((offs[0], offs[1], key))

    # Data must be covered exactly once, in order, with nothing left over (the library's own rule).
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise _corrupt(path, f"tensor {key!r} {what}")
        pos = end
    if pos > data_size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {pos} bytes of tensor data but the file has only {data_size}; "
            "download it again."
        )
    if pos < data_size:
        raise _corrupt(path, f"{data_size - pos} unexpected bytes follow the last tensor")

    entries = {
        key: TensorEntry(parsed[key][0], parsed[key][1], data_start + parsed[key][2], data_start + parsed[key][3])
        for _, _, key in spans
    }
    return SafetensorsHeader(entries=entries, metadata=metadata, data_start=data_start)


def encode_header(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Build the 8-byte length + padded JSON header for tensors laid out back to back in the given order.

    Returns the header bytes and each tensor's (begin, end) relative to the data section.
    """
    doc: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str, got {k!r}: {type(v).__name__}")
        doc[METADATA_KEY] = dict(metadata)
    offsets: list[tuple[int, int]] = []
    pos = 0
    for key, dtype, shape in entries:
        if not isinstance(key, str) or key == METADATA_KEY:
            raise ValueError(f"invalid tensor name {key!r}")
        if key in doc:
            raise ValueError(f"tensor {key!r} is listed twice")
        if dtype not in TORCH_TO_ST:
            raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which safetensors files here cannot hold")
        shape = [int(d) for d in shape]
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {key!r} has a negative dimension in {shape}")
        size = math.prod(shape) * itemsize(dtype)
        doc[key] = {"dtype": TORCH_TO_ST[dtype], "shape": shape, "data_offsets": [pos, pos + size]}
        offsets.append((pos, pos + size))
        pos += size
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
