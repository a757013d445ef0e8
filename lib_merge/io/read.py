"""Opening checkpoints: lazy safetensors, safe .ckpt/.pt, and in-memory dicts behind one small protocol.

safetensors tensors are read on demand with positional reads into freshly allocated buffers instead of through a
kept mmap: streaming a 7 GB model then leaves only the page cache behind, not a growing resident mapping, and
several threads can read at once. Pickled checkpoints go only through `torch.load(weights_only=True)`, so a
malicious pickle is refused instead of run. Key names are normalised the way the WebUI's `read_state_dict` does.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .format import CheckpointError, SafetensorsHeader, TensorEntry, itemsize, parse_header
from .metadata import check_name_encoding

SAFETENSORS_EXTS = (".safetensors",)
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")

# WebUI `sd_models.checkpoint_dict_replacements_sd1`: old SD1 checkpoints lack the `text_model.` level.
SD1_CLIP_RENAMES = (
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)
# WebUI `checkpoint_dict_replacements_sd2_turbo`: SD2.1 Turbo ships in SGM layout.
SD2_TURBO_RENAMES = (("conditioner.embedders.0.", "cond_stage_model."),)
# The WebUI's test for that layout: an OpenCLIP-H text encoder (width 1024) as embedder 0. SDXL's embedder 0 is a
# HF CLIP-L (`...embedders.0.transformer.`), so it never matches.
SD2_TURBO_PROBE = "conditioner.embedders.0.model.ln_final.weight"


@runtime_checkable
class Checkpoint(Protocol):
    """What the engine needs from a model: key list, shapes and dtypes without reading data, and tensors."""

    path: Path | None
    name: str

    def keys(self) -> list[str]: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def nbytes(self, key: str) -> int: ...
    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def get_span(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor: ...
    @property
    def opened_as(self) -> tuple[int, ...] | None: ...
    def changed_on_disk(self) -> bool: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Checkpoint: ...
    def __exit__(self, *exc: object) -> None: ...


def webui_key_names(keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
    """Map normalised key -> stored key, as WebUI's `get_state_dict_from_checkpoint` renames them.

    When two stored keys normalise to the same name the later one wins, as in the WebUI's dict rebuild.
    """
    keys = list(keys)
    turbo = SD2_TURBO_PROBE in keys and tuple(shape_of(SD2_TURBO_PROBE))[:1] == (1024,)
    renames = SD2_TURBO_RENAMES if turbo else SD1_CLIP_RENAMES
    out: dict[str, str] = {}
    for stored in keys:
        new = stored
        for old_prefix, new_prefix in renames:
            if new.startswith(old_prefix):
                new = new_prefix + new[len(old_prefix) :]
        out[new] = stored
    return out


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification and change times (the
    change time moves even when `cp -p` or `touch -r` restores the modification time)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Base:
    """Shared protocol plumbing: membership, length, context manager, closed-state checks."""

    path: Path | None
    name: str
    _closed: bool = False
    _identity: tuple[int, ...] | None = None  # file_identity of the file as opened (None: not a file)

    @property
    def finite_keys(self) -> set[str]:
        """Keys found to hold only finite values (core.engine skips checking them again where that is exact); they
        belong to this opening of the file, so a file changed on disk and opened anew is checked again."""
        if "_finite_keys" not in self.__dict__:
            self._finite_keys: set[str] = set()
        return self._finite_keys

    @property
    def opened_as(self) -> tuple[int, ...] | None:
        """The `file_identity` of the file as opened (None: not a file)."""
        return self._identity

    def changed_on_disk(self) -> bool:
        """Whether `path` no longer names the file as it was opened (replaced, rewritten, truncated, removed): a
        checkpoint kept open between merges must then be opened again, never read at its old header's offsets."""
        if self.path is None or self._identity is None:
            return False
        try:
            return file_identity(os.stat(self.path)) != self._identity
        except OSError:
            return True

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    def __len__(self) -> int:
        return len(self._index())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _index(self) -> Mapping[str, object]:
        raise NotImplementedError

    def _check_key(self, key: str) -> None:
        if self._closed:
            raise CheckpointError(f"{self._label()} was already closed; open it again to read {key!r}.")
        if key not in self._index():
            raise KeyError(f"{key!r} is not in {self._label()}")

    def _label(self) -> str:
        return str(self.path) if self.path is not None else f"in-memory checkpoint {self.name!r}"

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def nbytes(self, key: str) -> int:
        return itemsize(self.dtype(key)) * _numel(self.shape(key))

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._label()} ({len(self)} tensors)>"


def _check_span(start: int, stop: int, numel: int) -> None:
    if not 0 <= start <= stop <= numel:
        raise IndexError(f"span [{start}, {stop}) is outside a tensor of {numel} elements")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsCheckpoint(_Base):
    """A safetensors file read lazily with positional reads; the file descriptor stays open until close()."""

    def __init__(self, path: Path, fd: int, header: SafetensorsHeader, names: dict[str, str]):
        self.path = path
        self.name = path.stem
        self._fd = fd
        self._header = header
        self._identity = file_identity(os.fstat(fd))
        self._names = names  # normalised -> stored
        self._lock = threading.Lock()  # only for platforms without os.preadv

    def _index(self) -> Mapping[str, object]:
        return self._names

    def _entry(self, key: str) -> TensorEntry:
        self._check_key(key)
        return self._header.entries[self._names[key]]

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    def nbytes(self, key: str) -> int:
        return self._entry(key).nbytes

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._header.metadata)

    def stored_at(self, key: str) -> tuple[int, int]:
        """(open file descriptor, byte offset) of the tensor's data: a writer copies an unchanged tensor from
        there (valid until close())."""
        return self._fd, self._entry(key).start

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read into `out` (a contiguous uint8 buffer of at least nbytes, reused by the caller so
        that no fresh memory is touched) or into a new tensor."""
        entry = self._entry(key)
        return self.get_span(key, 0, _numel(entry.shape), out).reshape(entry.shape)

    def get_span(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor (1-D), read like `get`: a merge streams a large tensor
        through cache-sized pieces this way."""
        entry = self._entry(key)
        _check_span(start, stop, _numel(entry.shape))
        nbytes = (stop - start) * itemsize(entry.dtype)
        buf = out[:nbytes] if out is not None else torch.empty(nbytes, dtype=torch.uint8)
        self.read_span(key, start, stop, memoryview(buf.numpy()))
        return buf.view(entry.dtype)

    def read_span(self, key: str, start: int, stop: int, into: memoryview) -> None:
        """The stored bytes of elements [start, stop) of the flattened tensor, written into `into` (exactly that
        long): `get_span` without making a tensor, for a caller that reads thousands of pieces into views it keeps
        (each tensor view made and dropped under the GIL costs as much as a small piece's arithmetic)."""
        entry = self._entry(key)
        size = itemsize(entry.dtype)
        _check_span(start, stop, _numel(entry.shape))
        if len(into) != (stop - start) * size:
            raise ValueError(f"{len(into)} bytes cannot hold elements {start}..{stop} of {key!r}")
        if len(into):
            self._read_into(into, entry.start + start * size, key)

    def _read_into(self, view: memoryview, offset: int, key: str) -> None:
        done = 0
        total = len(view)
        preadv = getattr(os, "preadv", None)
        while done < total:
            try:
                if preadv is not None:
                    n = preadv(self._fd, [view[done:]], offset + done)
                else:  # Windows: no positional reads, so seek+read under a lock
                    with self._lock:
                        os.lseek(self._fd, offset + done, os.SEEK_SET)
                        chunk = os.read(self._fd, min(total - done, 1 << 26))
                        n = len(chunk)
                        view[done : done + n] = chunk
            except OSError as e:
                raise CheckpointError(f"Reading tensor {key!r} from {self.path} failed: {e}") from e
            if n == 0:
                raise CheckpointError(
                    f"{self.path} ended early while reading tensor {key!r}; it was truncated or changed after it was "
                    "opened. Check the file and try again."
                )
            done += n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __del__(self):  # a forgotten close() must not leak a descriptor
        try:
            self.close()
        except Exception:
            pass


class DictCheckpoint(_Base):
    """The protocol over an in-memory dict of tensors (the live model, tests). Non-tensor values are dropped."""

    def __init__(self, mapping: Mapping[str, object], name: str = "memory", metadata: Mapping[str, str] | None = None):
        self.path = None
        self.name = name
        # Spans are views of flat storage, so the rare non-contiguous tensor (a transposed view in an old .ckpt)
        # is made contiguous once here.
        self._tensors: dict[str, torch.Tensor] = {
            k: v if v.is_contiguous() else v.contiguous()
            for k, v in mapping.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
        }
        self._metadata = dict(metadata or {})

    def _index(self) -> Mapping[str, object]:
        return self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        self._check_key(key)
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        self._check_key(key)
        return self._tensors[key].dtype

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor itself (no copy; `out` is not needed): callers treat it as read-only."""
        self._check_key(key)
        t = self._tensors[key]
        return t if t.device.type == "cpu" else t.to("cpu")

    def get_span(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor: a view of the stored one (moved to the CPU if needed)."""
        self._check_key(key)
        t = self._tensors[key]
        _check_span(start, stop, t.numel())
        span = t.view(-1)[start:stop]
        return span if span.device.type == "cpu" else span.to("cpu")

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        self._closed = True
        self._tensors = {}


class TorchCheckpoint(DictCheckpoint):
    """A pickled checkpoint loaded (memory-mapped where possible) through `torch.load(weights_only=True)`."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], identity: tuple[int, ...] | None = None):
        super().__init__(tensors, name=path.stem)
        self.path = path
        self._identity = identity


def _stat_input(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"Model file {path} does not exist; check the name and folder.") from None
    except OSError as e:
        raise CheckpointError(f"Model file {path} cannot be accessed ({e.strerror}); check its permissions.") from e
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file; choose a .safetensors or .ckpt file.")
    return st


def _open_safetensors(path: Path) -> SafetensorsCheckpoint:
    size = _stat_input(path).st_size
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"Model file {path} cannot be opened ({e.strerror}); check its permissions.") from e
    try:
        head = os.pread(fd, 8, 0) if hasattr(os, "pread") else os.read(fd, 8)
        body = None
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            if 8 + n <= size and n <= 100_000_000:
                body = os.pread(fd, n, 8) if hasattr(os, "pread") else os.read(fd, n)
        header = parse_header(path, head, size, body)
        _library_check(path)
        names = webui_key_names(header.entries, lambda k: header.entries[k].shape)
        return SafetensorsCheckpoint(path, fd, header, names)
    except BaseException:
        os.close(fd)
        raise


def _library_check(path: Path) -> None:
    """Let the safetensors library validate the file too, so we never accept what it would refuse."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({e}); it is corrupt or incomplete, download it again."
        ) from e


def _unpickling_detail(e: Exception) -> str:
    """The one useful line of torch's long weights_only message (which global it refused)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def _torch_load(path: Path) -> object:
    import pickle

    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # mmap works only for the zip format (torch >= 1.6)
    except OSError as e:
        raise CheckpointError(f"Model file {path} cannot be opened ({e.strerror}); check its permissions.") from e

    try:
        with warnings.catch_warnings():  # torch's own notes (beta sparse layouts, deprecated storages) are not the
            warnings.simplefilter("ignore")  # user's business: what we refuse gets a message of its own
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} needs code to load (it pickles Python objects other than tensors), so it was not loaded: "
            "running such code could harm your computer. If you trust the file, convert it to .safetensors with "
            f"a trusted tool. Details: {_unpickling_detail(e)}"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}); it is corrupt, "
            "incomplete or not a model file. Download it again."
        ) from None


def _not_dense(tensor: torch.Tensor) -> str | None:
    """Why a tensor from a pickle is not an ordinary strided CPU tensor (sparse, quantized, nested...), or None."""
    if tensor.layout != torch.strided:
        return f"is stored in the {str(tensor.layout).replace('torch.', '')} layout"
    if tensor.is_quantized:
        return "is quantized"
    if getattr(tensor, "is_nested", False):
        return "is a nested tensor"
    if tensor.is_meta or tensor.device.type != "cpu":
        return f"has no data on the CPU (device {tensor.device})"
    return None


def _tensors_from_object(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dictionary of tensors; it is not a Stable Diffusion "
            "checkpoint."
        )
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        obj = inner
    tensors = {}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            problem = _not_dense(v)
            if problem:
                raise CheckpointError(
                    f"{path}: tensor {k!r} {problem}; only plain dense tensors can be merged. Convert the checkpoint "
                    "to .safetensors with a trusted tool, which stores dense tensors only."
                )
            tensors[k] = v.detach() if isinstance(v, torch.nn.Parameter) else v
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors; it is not a model checkpoint.")
    names = webui_key_names(tensors, lambda k: tuple(tensors[k].shape))
    return {new: tensors[stored] for new, stored in names.items()}


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model file for reading; the result must be closed (or used as a context manager)."""
    path = Path(path)
    check_name_encoding(path, "model")
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXTS:
        return _open_safetensors(path)
    if ext in PICKLE_EXTS:
        st = _stat_input(path)
        if st.st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes); download or save it again.")
        return TorchCheckpoint(path, _tensors_from_object(path, _torch_load(path)), file_identity(st))
    raise CheckpointError(
        f"{path} has an unknown extension {path.suffix!r}; model files must end in .safetensors, .ckpt, .pt, "
        ".pth or .bin."
    )
