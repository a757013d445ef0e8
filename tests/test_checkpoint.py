"""Checkpoint reading, writing and save-time transforms, against hand-built files and independent expectations."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_merge.core.errors import MergeError
from lib_merge.io import read as checkpoint_read
from lib_merge.io.checkpoint import (
    CLIP_POSITION_ID_KEYS,
    Checkpoint,
    CheckpointError,
    DictCheckpoint,
    SafetensorsStreamWriter,
    SaveOptions,
    atomic_output,
    check_output_path,
    clip_id_problems,
    default_output_name,
    finalize_tensor,
    merge_metadata,
    open_checkpoint,
    open_vae,
    plan_output,
    save_state_dict,
    validate_custom_name,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers written independently of the code under test


def raw_safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors-shaped file from an arbitrary header object (no padding, no checks)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and tensor_bytes(a) == tensor_bytes(b)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # random bit patterns, so NaN payloads, infinities and subnormals all have to survive bit-exactly
    f32 = torch.randint(0, 2**31 - 1, (3, 4), generator=g, dtype=torch.int32).view(torch.float32)
    f16 = torch.randint(-(2**15), 2**15 - 1, (5,), generator=g, dtype=torch.int16).view(torch.float16)
    bf16 = torch.randint(-(2**15), 2**15 - 1, (2, 3), generator=g, dtype=torch.int16).view(torch.bfloat16)
    return {
        "model.f32": f32,
        "model.f16": f16,
        "model.bf16": bf16,
        "f64": torch.tensor([1.0 / 3.0, -0.0, float("inf")], dtype=torch.float64),
        "i64": torch.tensor([[-(2**62), 2**62 + 5]], dtype=torch.int64),
        "i32": torch.tensor([7, -7], dtype=torch.int32),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "f8a": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "f8b": torch.tensor([1.5, 4.0, 0.25]).to(torch.float8_e5m2),
    }


@pytest.fixture
def st_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})
    return path, tensors


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


# ---------------------------------------------------------------------------------------------------------------
# safetensors reading


def test_safetensors_roundtrip_bit_exact(st_file):
    path, tensors = st_file
    with open_checkpoint(path) as ck:
        assert isinstance(ck, Checkpoint)
        assert ck.path == path and ck.name == "model"
        assert sorted(ck.keys()) == sorted(tensors)
        assert len(ck) == len(tensors)
        assert ck.metadata == {"format": "pt", "note": "hi"}
        for key, t in tensors.items():
            assert key in ck
            assert ck.shape(key) == tuple(t.shape)
            assert ck.dtype(key) == t.dtype
            assert ck.nbytes(key) == t.numel() * t.element_size()
            got = ck.get(key)
            assert got.device.type == "cpu"
            assert same_bits(got, t), key
        assert "missing" not in ck


def test_keys_follow_data_order_in_file(st_file):
    path, _ = st_file
    header = header_of(path)
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    with open_checkpoint(path) as ck:
        assert ck.keys() == by_offset


def test_shape_and_dtype_do_not_read_data(st_file, monkeypatch):
    path, tensors = st_file
    with open_checkpoint(path) as ck:

        def no_reads(*a, **k):
            raise AssertionError("tensor data was read")

        for name in ("preadv", "pread", "read", "readv"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, no_reads)
        for key, t in tensors.items():  # the answers come from the header alone, and they are the tensors' own
            assert ck.shape(key) == tuple(t.shape), key
            assert ck.dtype(key) == t.dtype, key
            assert ck.nbytes(key) == t.numel() * t.element_size(), key


def test_get_returns_fresh_tensor(st_file):
    path, tensors = st_file
    with open_checkpoint(path) as ck:
        a = ck.get("i32")
        a.fill_(0)
        assert torch.equal(ck.get("i32"), tensors["i32"])


def test_no_metadata_gives_empty_dict(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(path))
    with open_checkpoint(path) as ck:
        assert ck.metadata == {}


def test_concurrent_reads_from_threads(tmp_path):
    tensors = {f"k{i}": torch.arange(i * 100, i * 100 + 5000, dtype=torch.float32) for i in range(16)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    with open_checkpoint(path) as ck, ThreadPoolExecutor(8) as pool:
        keys = list(tensors) * 8
        results = list(pool.map(ck.get, keys))
    for key, got in zip(keys, results, strict=True):
        assert torch.equal(got, tensors[key])


def test_reads_without_preadv(st_file, monkeypatch):
    """The Windows path: seek + read under a lock."""
    path, tensors = st_file
    monkeypatch.delattr(os, "preadv")
    with open_checkpoint(path) as ck:
        for key, t in tensors.items():
            assert same_bits(ck.get(key), t)


def test_close_releases_fd_and_blocks_reads(st_file):
    path, _ = st_file
    ck = open_checkpoint(path)
    fd = ck._fd
    os.fstat(fd)  # open
    ck.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(CheckpointError, match="closed"):
        ck.get("i32")
    ck.close()  # idempotent


def test_context_manager_closes(st_file):
    path, _ = st_file
    with open_checkpoint(path) as ck:
        pass
    with pytest.raises(CheckpointError):
        ck.get("i32")


def test_unknown_key_is_key_error(st_file):
    path, _ = st_file
    with open_checkpoint(path) as ck, pytest.raises(KeyError):
        ck.get("nope")


def test_file_truncated_after_open(tmp_path):
    path = tmp_path / "shrinks.safetensors"
    save_file({"a": torch.ones(1000)}, str(path))
    with open_checkpoint(path) as ck:
        os.truncate(path, path.stat().st_size - 100)
        with pytest.raises(CheckpointError, match="ended early"):
            ck.get("a")


# --- validation of broken files -------------------------------------------------------------------------------


def good_header() -> dict:
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


BROKEN = {
    "unknown_dtype": ({"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    "negative_dim": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    "float_dim": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    "bool_dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    "shape_not_list": ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    "size_mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    "reversed_offsets": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets"),
    "offsets_missing": ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "data_offsets"),
    "entry_not_object": ({"a": [1, 2]}, b"", "not an object"),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        },
        b"\0" * 8,
        "overlaps",
    ),
    "gap": (
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        b"\0" * 12,
        "gap",
    ),
    "trailing_bytes": (good_header(), b"\0" * 12, "unexpected bytes"),
    "metadata_not_str": ({"__metadata__": {"x": 1}, **good_header()}, b"\0" * 8, "__metadata__"),
    "metadata_not_dict": ({"__metadata__": ["x"], **good_header()}, b"\0" * 8, "__metadata__"),
    "json_array": ([1, 2], b"", "not a JSON object"),
    "bad_json": (b'{"a": ', b"", "not valid JSON"),
    "bad_utf8": (b'{"\xff": 1}', b"", "not valid JSON"),
    "duplicate_key": (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
        "twice",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_headers_are_refused_naming_the_file(tmp_path, case):
    header, data, fragment = BROKEN[case]
    path = raw_safetensors(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_data_shorter_than_header_says_is_truncated(tmp_path):
    path = raw_safetensors(tmp_path / "t.safetensors", good_header(), b"\0" * 5)
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_header_longer_than_file_is_truncated(tmp_path):
    body = json.dumps(good_header()).encode()
    path = raw_safetensors(tmp_path / "t.safetensors", body + b"\0" * 8, length=len(body) + 500)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_cut_download_is_truncated(st_file):
    path, _ = st_file
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 3])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("length", [0, 1, 2**63, 100_000_001])
def test_implausible_header_length(tmp_path, length):
    path = raw_safetensors(tmp_path / "h.safetensors", b"{}" + b"\0" * 16, length=length)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_and_tiny_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        open_checkpoint(empty)
    assert str(empty) in str(info.value)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tiny)


def test_unpadded_header_is_accepted(tmp_path):
    """Other writers do not always pad; the library reads such files, so must we."""
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    body = json.dumps(header).encode()
    assert len(body) % 8
    path = raw_safetensors(tmp_path / "u.safetensors", body, struct.pack("<f", 1.5))
    with open_checkpoint(path) as ck:
        assert ck.get("a").tolist() == [1.5]


def test_library_rejection_becomes_checkpoint_error(st_file, monkeypatch):
    import safetensors

    class Refuses:
        def __init__(self, *a, **k):
            raise safetensors.SafetensorError("library says no")

    monkeypatch.setattr(safetensors, "safe_open", Refuses)
    path, _ = st_file
    with pytest.raises(CheckpointError, match="library says no") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_failed_open_does_not_leak_fds(tmp_path):
    path = raw_safetensors(tmp_path / "bad.safetensors", [1], b"")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(20):
        with pytest.raises(CheckpointError):
            open_checkpoint(path)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds


# --- file-level errors ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.ckpt")


def test_directory(tmp_path):
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    with pytest.raises(CheckpointError, match="folder"):
        open_checkpoint(d)
    d2 = tmp_path / "folder.ckpt"
    d2.mkdir()
    with pytest.raises(CheckpointError, match="folder"):
        open_checkpoint(d2)


@pytest.mark.parametrize("name", ["model.txt", "model", "model.gguf", "model.safetensors.part"])
def test_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extension") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_extension_case_insensitive(tmp_path):
    path = tmp_path / "UPPER.SAFETENSORS"
    save_file({"x": torch.ones(1)}, str(path))
    with open_checkpoint(path) as ck:
        assert ck.keys() == ["x"] and ck.name == "UPPER"


def test_unreadable_file(st_file, monkeypatch):
    path, _ = st_file
    real_open = os.open

    def deny(p, *a, **k):
        if Path(p) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(CheckpointError, match="permissions") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


# --- key normalisation (WebUI get_state_dict_from_checkpoint) ---------------------------------------------------

OLD_SD1 = {
    "cond_stage_model.transformer.embeddings.token_embedding.weight": torch.ones(4, 2),
    "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": torch.ones(2, 2),
    "cond_stage_model.transformer.final_layer_norm.weight": torch.ones(2),
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight": torch.ones(2, 2),
    "model.diffusion_model.out.0.weight": torch.ones(3),
}
OLD_SD1_EXPECTED = {
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
    "model.diffusion_model.out.0.weight",
}


def turbo_like(width: int) -> dict[str, torch.Tensor]:
    return {
        "conditioner.embedders.0.model.ln_final.weight": torch.ones(width),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": torch.ones(3, 2),
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2),
        # an old-style SD1 key is NOT renamed when the turbo rule applies (the WebUI picks one table)
        "cond_stage_model.transformer.embeddings.x": torch.ones(1),
    }


def write_ckpt(path: Path, obj) -> Path:
    torch.save(obj, str(path))
    return path


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_old_sd1_clip_keys_renamed(tmp_path, ext):
    path = tmp_path / f"old{ext}"
    if ext == ".safetensors":
        save_file(OLD_SD1, str(path))
    else:
        write_ckpt(path, {"state_dict": OLD_SD1})
    with open_checkpoint(path) as ck:
        assert set(ck.keys()) == OLD_SD1_EXPECTED
        got = ck.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        assert torch.equal(got, torch.ones(4, 2))


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_sd2_turbo_keys_renamed(tmp_path, ext):
    path = tmp_path / f"turbo{ext}"
    tensors = turbo_like(1024)
    save_file(tensors, str(path)) if ext == ".safetensors" else write_ckpt(path, tensors)
    with open_checkpoint(path) as ck:
        assert set(ck.keys()) == {
            "cond_stage_model.model.ln_final.weight",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.embeddings.x",
        }
        assert ck.shape("cond_stage_model.model.ln_final.weight") == (1024,)


def test_not_turbo_when_width_differs_or_sdxl(tmp_path):
    path = tmp_path / "w768.safetensors"
    save_file(turbo_like(768), str(path))
    with open_checkpoint(path) as ck:
        assert "conditioner.embedders.0.model.ln_final.weight" in ck
        assert "cond_stage_model.transformer.text_model.embeddings.x" in ck
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(768),
        "conditioner.embedders.1.model.ln_final.weight": torch.ones(1280),
    }
    path = tmp_path / "xl.safetensors"
    save_file(sdxl, str(path))
    with open_checkpoint(path) as ck:
        assert set(ck.keys()) == set(sdxl)


def test_renamed_collision_later_wins_like_webui():
    names = checkpoint_read.webui_key_names(
        ["cond_stage_model.transformer.text_model.embeddings.a", "cond_stage_model.transformer.embeddings.a"],
        lambda k: (1,),
    )
    assert names == {
        "cond_stage_model.transformer.text_model.embeddings.a": "cond_stage_model.transformer.embeddings.a"
    }


# ---------------------------------------------------------------------------------------------------------------
# pickled checkpoints


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_ckpt_unwraps_state_dict_and_drops_non_tensors(tmp_path, ext):
    sd = {"model.a": torch.arange(4.0), "b": torch.tensor(7, dtype=torch.int64), "junk": 3, "s": "text"}
    path = write_ckpt(tmp_path / f"m{ext}", {"state_dict": sd, "global_step": 10, "epoch": 1})
    with open_checkpoint(path) as ck:
        assert isinstance(ck, Checkpoint)
        assert ck.keys() == ["model.a", "b"]
        assert ck.path == path and ck.name == "m" and ck.metadata == {}
        assert torch.equal(ck.get("model.a"), torch.arange(4.0))
        assert ck.dtype("b") == torch.int64 and ck.shape("b") == () and ck.nbytes("model.a") == 16


def test_ckpt_flat_dict_and_parameters(tmp_path):
    path = write_ckpt(tmp_path / "flat.pt", {"w": torch.nn.Parameter(torch.ones(2, 2)), "n": None})
    with open_checkpoint(path) as ck:
        assert ck.keys() == ["w"]
        t = ck.get("w")
        assert type(t) is torch.Tensor and not t.requires_grad


def test_legacy_non_zip_ckpt_loads(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"a": torch.arange(3)}}, str(path), _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    with open_checkpoint(path) as ck:
        assert torch.equal(ck.get("a"), torch.arange(3))


class _Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_evil_pickle_in_zip_ckpt_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_ckpt(tmp_path / "evil.ckpt", {"state_dict": {"a": torch.ones(1)}, "x": _Evil(marker)})
    with pytest.raises(CheckpointError, match="needs code to load") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # control: the same payload really does run when unpickled unsafely
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control))).close()
    assert control.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_evil_raw_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"a": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="needs code to load"):
        open_checkpoint(path)
    assert not marker.exists()


def test_ckpt_top_level_not_a_dict(tmp_path):
    path = write_ckpt(tmp_path / "list.pt", [torch.ones(1), torch.ones(2)])
    with pytest.raises(CheckpointError, match="list") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    path = write_ckpt(tmp_path / "tensor.pt", torch.ones(3))
    with pytest.raises(CheckpointError, match="Tensor"):
        open_checkpoint(path)


def test_ckpt_without_tensors(tmp_path):
    path = write_ckpt(tmp_path / "none.ckpt", {"state_dict": {"a": 1}, "b": "x"})
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint at all"])
def test_ckpt_empty_or_garbage(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_ckpt_truncated(tmp_path):
    path = write_ckpt(tmp_path / "cut.ckpt", {"a": torch.ones(1000)})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# DictCheckpoint


def test_dict_checkpoint_protocol():
    ck = DictCheckpoint({"a": torch.ones(2, 3), "b": torch.zeros((), dtype=torch.int64), "c": 5}, name="live")
    assert isinstance(ck, Checkpoint)
    assert ck.path is None and ck.name == "live" and ck.metadata == {}
    assert ck.keys() == ["a", "b"] and len(ck) == 2 and "c" not in ck
    assert ck.shape("a") == (2, 3) and ck.dtype("b") == torch.int64 and ck.nbytes("a") == 24
    assert torch.equal(ck.get("a"), torch.ones(2, 3))
    with pytest.raises(KeyError):
        ck.get("c")
    with ck:
        pass
    with pytest.raises(CheckpointError, match="closed"):
        ck.get("a")


def test_dict_checkpoint_default_name_and_metadata():
    ck = DictCheckpoint({"a": torch.ones(1)}, metadata={"k": "v"})
    assert ck.name == "memory" and ck.metadata == {"k": "v"}
    ck.metadata["k"] = "changed"
    assert ck.metadata == {"k": "v"}


# ---------------------------------------------------------------------------------------------------------------
# atomic output and output-path checks


def test_atomic_output_success(tmp_path):
    target = tmp_path / "out.safetensors"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.safetensors.tmp-")
        assert not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize(
    ("exc", "raised"),
    [(RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), KeyboardInterrupt),
     (OSError(errno.ENOSPC, "No space left on device"), CheckpointError),  # said as what to do, naming the file
     (OSError(errno.EFBIG, "File too large"), CheckpointError), (OSError(errno.EACCES, "denied"), OSError)],
    ids=["error", "ctrl-c", "enospc", "efbig", "eacces"],
)
def test_atomic_output_failure_leaves_nothing(tmp_path, exc, raised):
    target = tmp_path / "out.safetensors"
    with pytest.raises(raised) as err, atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise exc
    if raised is CheckpointError:
        assert str(err.value).startswith(f"Could not write {target}: {exc.strerror}. Nothing was saved")
    assert os.listdir(tmp_path) == []


def test_atomic_output_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "out.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.ckpt"]


def test_atomic_output_refuses_existing_before_writing(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    ran = []
    with pytest.raises(CheckpointError, match="exists; pass --overwrite or choose another name"):
        with atomic_output(target) as tmp:
            ran.append(tmp)
    assert ran == [] and target.read_bytes() == b"keep me"
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_output_missing_folder_and_folder_target(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        with atomic_output(tmp_path / "no" / "such" / "out.ckpt"):
            pass
    assert str(tmp_path / "no" / "such") in str(info.value)
    (tmp_path / "d.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="folder"):
        with atomic_output(tmp_path / "d.ckpt", overwrite=True):
            pass


def test_atomic_output_nothing_written(tmp_path):
    with pytest.raises(CheckpointError, match="Nothing was written"):
        with atomic_output(tmp_path / "x.ckpt"):
            pass
    assert os.listdir(tmp_path) == []


def test_atomic_output_long_name(tmp_path):
    target = tmp_path / ("n" * 240 + ".safetensors")
    with atomic_output(target) as tmp:
        assert len(tmp.name.encode()) <= 255
        tmp.write_bytes(b"x")
    assert target.exists()


def test_atomic_output_target_appearing_meanwhile(tmp_path):
    target = tmp_path / "race.ckpt"
    with pytest.raises(CheckpointError, match="appeared"), atomic_output(target) as tmp:
        tmp.write_bytes(b"mine")
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["race.ckpt"]


def test_check_output_path_refuses_inputs_even_with_overwrite(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    b = tmp_path / "b.safetensors"
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="never overwritten") as info:
            check_output_path(a, [b, a], overwrite=overwrite)
        assert str(a) in str(info.value)
        with pytest.raises(CheckpointError, match="never overwritten"):
            check_output_path(tmp_path / "sub" / ".." / "a.safetensors", [a], overwrite)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    with pytest.raises(CheckpointError, match="never overwritten"):
        check_output_path(link, [a], True)
    hard = tmp_path / "hard.safetensors"
    os.link(a, hard)
    with pytest.raises(CheckpointError, match="never overwritten"):
        check_output_path(hard, [a], True)


def test_check_output_path_other_rules(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    out = tmp_path / "out.safetensors"
    assert check_output_path(out, [a, None], False) == out
    out.write_bytes(b"y")
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_output_path(out, [a], False)
    assert check_output_path(out, [a], True) == out
    with pytest.raises(CheckpointError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "o.ckpt", [a], True)


# ---------------------------------------------------------------------------------------------------------------
# streamed safetensors writing


def entries_of(tensors: dict[str, torch.Tensor]):
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_stream_writer_roundtrip_all_dtypes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "s.safetensors"
    meta = {"format": "pt", "ünï": "cödé"}
    with SafetensorsStreamWriter(path, entries_of(tensors), meta) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert same_bits(loaded[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta


def test_stream_writer_header_layout(tmp_path):
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.int64)}
    path = tmp_path / "h.safetensors"
    with SafetensorsStreamWriter(path, entries_of(tensors), {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    text = raw[8 : 8 + n].decode()
    assert text.startswith('{"__metadata__":{"format":"pt"},')
    stripped = text.rstrip(" ")
    assert len(text) - len(stripped) < 8
    header = json.loads(stripped)
    assert list(header) == ["__metadata__", "b", "a"]
    assert header["b"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert header["a"] == {"dtype": "I64", "shape": [2], "data_offsets": [12, 28]}
    assert len(raw) == 8 + n + 28


def test_stream_writer_bytes_identical_to_library(tmp_path):
    """Same tensors in the library's order and one metadata entry: the files must match byte for byte."""
    tensors = {"a.w": torch.randn(3, 4), "b": torch.randn(5), "c": torch.randn(()), "d": torch.randn(0, 2)}
    for meta in (None, {"format": "pt"}):
        lib = tmp_path / "lib.safetensors"
        mine = tmp_path / "mine.safetensors"
        save_file(tensors, str(lib), metadata=meta)
        with SafetensorsStreamWriter(mine, entries_of(tensors), meta) as w:
            for k, v in tensors.items():
                w.write(k, v)
        assert mine.read_bytes() == lib.read_bytes()


def test_stream_writer_makes_contiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    t = base.t()
    assert not t.is_contiguous()
    path = tmp_path / "c.safetensors"
    with SafetensorsStreamWriter(path, [("t", t.dtype, t.shape)]) as w:
        w.write("t", t)
    assert torch.equal(load_file(str(path))["t"], t)


def test_stream_writer_checks(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.int64, ())]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="float16"):
        w.write("a", torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        w.write("a", torch.ones(3))
    w.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="already written"):
        w.write("a", torch.ones(2))
    assert w.pending == ["b"]
    with pytest.raises(CheckpointError, match="1 of 2 tensors were not written") as info:
        w.close()
    assert "'b'" in str(info.value)
    with pytest.raises(CheckpointError, match="closed"):
        w.write("b", torch.tensor(1))


def test_stream_writer_accepts_any_order_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{i}": torch.full((i + 1, 3), float(i), dtype=torch.float16) for i in range(40)}
    path = tmp_path / "threads.safetensors"
    with SafetensorsStreamWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"m": "1"}) as w:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: w.write(k, tensors[k]), reversed(list(tensors))))
    loaded = load_file(str(path))
    assert list(loaded) == list(tensors) or set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_stream_writer_extra_key(tmp_path):
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", torch.float32, ())]) as w:
        w.write("a", torch.tensor(1.0))
        with pytest.raises(ValueError, match="not declared"):
            w.write("z", torch.tensor(1.0))


def test_stream_writer_bad_declarations(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        SafetensorsStreamWriter(tmp_path / "a.safetensors", [("a", torch.float32, ()), ("a", torch.float32, ())])
    with pytest.raises(ValueError):
        SafetensorsStreamWriter(tmp_path / "b.safetensors", [("__metadata__", torch.float32, ())])
    with pytest.raises(TypeError, match="metadata"):
        SafetensorsStreamWriter(tmp_path / "c.safetensors", [], {"k": 1})
    with pytest.raises(CheckpointError, match="complex64"):
        SafetensorsStreamWriter(tmp_path / "d.safetensors", [("c", torch.complex64, (1,))])
    assert not any(p.name in {"a.safetensors", "b.safetensors", "c.safetensors"} for p in tmp_path.iterdir())


def test_stream_writer_inside_atomic_output_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp, SafetensorsStreamWriter(tmp, entries) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("merge failed half way")
    assert os.listdir(tmp_path) == []


def test_stream_writer_incomplete_inside_atomic_output(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="incomplete"):
        with atomic_output(target) as tmp, SafetensorsStreamWriter(tmp, [("a", torch.float32, (2,))]):
            pass
    assert os.listdir(tmp_path) == []


def test_stream_writer_disk_full(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    entries = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    with pytest.raises(CheckpointError) as info:
        with atomic_output(target) as tmp, SafetensorsStreamWriter(tmp, entries) as w:
            w.write("a", torch.ones(4))

            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(os, "pwrite", full)
            w.write("b", torch.ones(4))
    assert str(info.value).startswith(f"Could not write {target}: No space left on device. Nothing was saved")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# save_state_dict


def test_save_state_dict_safetensors(tmp_path):
    tensors = sample_tensors()
    path = save_state_dict(tensors, tmp_path / "o.safetensors", metadata={"format": "pt"})
    loaded = load_file(str(path))
    for k, v in tensors.items():
        assert same_bits(loaded[k], v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_save_state_dict_shared_storage_is_written_twice(tmp_path):
    """safetensors.save_file refuses aliased tensors (SDXL cond_stage_model.*); the stream writer copies them."""
    t = torch.arange(4.0)
    path = save_state_dict({"a": t, "b": t}, tmp_path / "alias.safetensors")
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t)


def test_save_state_dict_ckpt_is_plain_dict(tmp_path):
    big = torch.arange(100_000.0)
    view = big[:3]
    tensors = {"model.a": torch.ones(2, 2), "v": view, "i": torch.tensor([1, 2])}
    path = save_state_dict(tensors, tmp_path / "o.ckpt")
    loaded = torch.load(str(path), weights_only=True)
    assert type(loaded) is dict and set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    assert path.stat().st_size < 100_000  # the view did not drag its 400 KB storage along


def test_save_state_dict_refusals(tmp_path):
    with pytest.raises(CheckpointError, match=".safetensors or .ckpt"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "o.pt")
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="--overwrite"):
        save_state_dict({"a": torch.ones(1)}, existing)
    assert existing.read_bytes() == b"old"
    save_state_dict({"a": torch.ones(1)}, existing, overwrite=True)
    assert torch.equal(load_file(str(existing))["a"], torch.ones(1))
    with pytest.raises(TypeError):
        save_state_dict({"a": 1}, tmp_path / "n.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["e.safetensors"]


def test_save_then_open_roundtrip(tmp_path):
    tensors = sample_tensors()
    for ext in (".safetensors", ".ckpt"):
        path = save_state_dict(tensors, tmp_path / f"r{ext}")
        with open_checkpoint(path) as ck:
            assert set(ck.keys()) == set(tensors)
            for k, v in tensors.items():
                assert same_bits(ck.get(k), v), (ext, k)


# ---------------------------------------------------------------------------------------------------------------
# save options


def sd1_entries():
    return [
        ("model.diffusion_model.input_blocks.0.0.weight", torch.float32, (4, 4)),
        ("model.diffusion_model.input_blocks.0.0.bias", torch.bfloat16, (4,)),
        ("first_stage_model.decoder.conv_in.weight", torch.float32, (2, 2)),
        ("first_stage_model.encoder.conv_in.bias", torch.float64, (2,)),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.int64, (1, 77)),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", torch.float16, (3,)),
        ("model_ema.diffusion_modelinput_blocks00weight", torch.float32, (4, 4)),
        ("model_ema.num_updates", torch.int32, ()),
        ("model_ema.decay", torch.float32, ()),
        ("betas", torch.float32, (10,)),
        ("alphas_cumprod", torch.float64, (10,)),
        ("model.diffusion_model.fp8.weight", torch.float8_e4m3fn, (2,)),
    ]


def test_save_options_validation():
    assert SaveOptions() == SaveOptions(dtype="keep", prune=False, bake_vae=None, reset_clip_ids=False)
    with pytest.raises(MergeError, match="fp8"):
        SaveOptions(dtype="fp8")


def test_plan_keep_changes_nothing():
    entries = sd1_entries()
    assert plan_output(entries, False, SaveOptions()) == entries


def test_plan_fp16_converts_only_float_model_keys():
    plan = dict((k, d) for k, d, _ in plan_output(sd1_entries(), False, SaveOptions(dtype="fp16")))
    h = torch.float16
    assert plan == {
        "model.diffusion_model.input_blocks.0.0.weight": h,
        "model.diffusion_model.input_blocks.0.0.bias": h,
        "first_stage_model.decoder.conv_in.weight": h,
        "first_stage_model.encoder.conv_in.bias": h,
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.int64,
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": h,
        "model_ema.diffusion_modelinput_blocks00weight": h,
        "model_ema.num_updates": torch.int32,
        "model_ema.decay": h,
        "betas": torch.float32,  # no "model" in the key: schedule buffers stay as they are
        "alphas_cumprod": torch.float64,
        "model.diffusion_model.fp8.weight": h,  # fp8 is computed in fp32 and saved in the chosen dtype
    }


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_plan_other_dtypes(name, dtype):
    plan = {k: d for k, d, _ in plan_output(sd1_entries(), False, SaveOptions(dtype=name))}
    assert plan["model.diffusion_model.input_blocks.0.0.bias"] == dtype
    assert plan["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == dtype
    assert plan["model.diffusion_model.fp8.weight"] == dtype
    assert plan["betas"] == torch.float32 and plan["model_ema.num_updates"] == torch.int32


def test_plan_prune_sd1():
    keys = [k for k, _, _ in plan_output(sd1_entries(), False, SaveOptions(prune=True))]
    assert keys == [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.0.0.bias",
        "first_stage_model.decoder.conv_in.weight",
        "first_stage_model.encoder.conv_in.bias",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "model.diffusion_model.fp8.weight",
    ]


def sdxl_entries():
    return [
        ("model.diffusion_model.out.2.weight", torch.float16, (4, 4)),
        ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", torch.int64, (1, 77)),
        ("conditioner.embedders.1.model.ln_final.weight", torch.float16, (8,)),
        ("cond_stage_model.embedders.0.alias", torch.float16, (8,)),
        ("first_stage_model.decoder.conv_out.bias", torch.float32, (3,)),
        ("model_ema.decay", torch.float32, ()),
        ("denoiser.sigmas", torch.float32, (5,)),
    ]


def test_plan_sdxl_drops_cond_stage_model_always():
    keys = [k for k, _, _ in plan_output(sdxl_entries(), True, SaveOptions())]
    assert "cond_stage_model.embedders.0.alias" not in keys and len(keys) == 6
    pruned = [k for k, _, _ in plan_output(sdxl_entries(), True, SaveOptions(prune=True))]
    assert pruned == [
        "model.diffusion_model.out.2.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.ln_final.weight",
        "first_stage_model.decoder.conv_out.bias",
    ]


def test_sd1_keeps_cond_stage_model_without_prune():
    keys = [k for k, _, _ in plan_output(sd1_entries(), False, SaveOptions())]
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def make_vae(tmp_path: Path, prefixed: bool, name: str = "vae.safetensors", **override) -> Path:
    vae = {
        "decoder.conv_in.weight": torch.full((2, 2), 7.0, dtype=torch.float16),
        "encoder.conv_in.bias": torch.tensor([1.5, -2.5], dtype=torch.float32),
        "quant_conv.weight": torch.ones(9),  # not in the model: ignored
    }
    vae.update(override)
    if prefixed:
        vae = {"first_stage_model." + k: v for k, v in vae.items()}
    path = tmp_path / name
    save_file(vae, str(path))
    return path


@pytest.mark.parametrize("prefixed", [False, True])
def test_bake_vae(tmp_path, prefixed):
    vae_path = make_vae(tmp_path, prefixed)
    opts = SaveOptions(bake_vae=vae_path)
    entries = sd1_entries()
    with open_vae(opts) as vae:
        plan = plan_output(entries, False, opts, vae)
        assert plan == entries  # same keys, shapes, and (keep) dtypes
        t = finalize_tensor("first_stage_model.decoder.conv_in.weight", torch.zeros(2, 2), opts, vae)
        assert t.dtype == torch.float32 and torch.equal(t, torch.full((2, 2), 7.0))
        t = finalize_tensor("first_stage_model.encoder.conv_in.bias", torch.zeros(2, dtype=torch.float64), opts, vae)
        assert t.dtype == torch.float64 and t.tolist() == [1.5, -2.5]
        other = torch.ones(4, 4)
        assert finalize_tensor("model.diffusion_model.input_blocks.0.0.weight", other, opts, vae) is other


def test_bake_vae_with_fp16(tmp_path):
    opts = SaveOptions(dtype="fp16", bake_vae=make_vae(tmp_path, False))
    with open_vae(opts) as vae:
        plan = {k: d for k, d, _ in plan_output(sd1_entries(), False, opts, vae)}
        t = finalize_tensor("first_stage_model.encoder.conv_in.bias", torch.zeros(2, dtype=torch.float64), opts, vae)
    assert plan["first_stage_model.encoder.conv_in.bias"] == torch.float16 == t.dtype
    assert t.tolist() == [1.5, -2.5]


def test_bake_vae_missing_key(tmp_path):
    vae_path = tmp_path / "partial.safetensors"
    save_file({"decoder.conv_in.weight": torch.ones(2, 2)}, str(vae_path))
    opts = SaveOptions(bake_vae=vae_path)
    with open_vae(opts) as vae:
        with pytest.raises(CheckpointError, match="encoder.conv_in.bias") as info:
            plan_output(sd1_entries(), False, opts, vae)
        assert str(vae_path) in str(info.value)
        with pytest.raises(CheckpointError, match="has no tensor"):
            finalize_tensor("first_stage_model.encoder.conv_in.bias", torch.zeros(2), opts, vae)


def test_bake_vae_shape_mismatch(tmp_path):
    vae_path = make_vae(tmp_path, False, **{"decoder.conv_in.weight": torch.ones(3, 2)})
    opts = SaveOptions(bake_vae=vae_path)
    with open_vae(opts) as vae:
        with pytest.raises(CheckpointError, match=r"\[3, 2\]") as info:
            plan_output(sd1_entries(), False, opts, vae)
        assert str(vae_path) in str(info.value)
        with pytest.raises(CheckpointError, match="does not fit"):
            finalize_tensor("first_stage_model.decoder.conv_in.weight", torch.zeros(2, 2), opts, vae)


def test_bake_vae_requires_opened_vae(tmp_path):
    opts = SaveOptions(bake_vae=tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="open_vae"):
        plan_output(sd1_entries(), False, opts, None)
    with pytest.raises(ValueError):
        finalize_tensor("first_stage_model.x", torch.ones(1), opts, None)
    assert open_vae(SaveOptions()) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        open_vae(opts)


def test_bake_vae_skipped_keys_stay_out(tmp_path):
    """Pruned-away keys are not baked back in; VAE keys not in the model are ignored."""
    opts = SaveOptions(prune=True, bake_vae=make_vae(tmp_path, True))
    with open_vae(opts) as vae:
        keys = [k for k, _, _ in plan_output(sd1_entries(), False, opts, vae)]
    assert "first_stage_model.quant_conv.weight" not in keys
    assert "betas" not in keys


def test_reset_clip_ids():
    opts = SaveOptions(reset_clip_ids=True, dtype="fp16")
    broken = torch.arange(77, dtype=torch.float32)[None].clone()
    broken[0, 5] = 4.9999
    broken[0, 76] = 75.0
    for entries, is_sdxl in ((sd1_entries(), False), (sdxl_entries(), True)):
        plan = {k: (d, s) for k, d, s in plan_output(entries, is_sdxl, opts)}
        for key in CLIP_POSITION_ID_KEYS:
            if key in plan:
                assert plan[key] == (torch.int64, (1, 77))
    for key in CLIP_POSITION_ID_KEYS:
        out = finalize_tensor(key, broken, opts)
        assert out.dtype == torch.int64 and out.tolist() == [list(range(77))]
    assert broken[0, 5].item() == pytest.approx(4.9999)  # input untouched


def test_reset_clip_ids_fixes_wrong_shape_and_dtype_in_plan():
    entries = [("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.float32, (77,))]
    assert plan_output(entries, False, SaveOptions(reset_clip_ids=True)) == [
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.int64, (1, 77))
    ]
    assert plan_output(entries, False, SaveOptions()) == entries


def test_reset_clip_ids_does_not_add_missing_key():
    entries = [("model.diffusion_model.x", torch.float32, (1,))]
    assert plan_output(entries, False, SaveOptions(reset_clip_ids=True)) == entries


def test_clip_id_problems():
    good = torch.arange(77, dtype=torch.int64)[None]
    assert clip_id_problems(good) == []
    bad = good.to(torch.float32).clone()
    bad[0, 3] = 2.9999
    bad[0, 60] = 61
    assert clip_id_problems(bad) == [3, 60]
    assert clip_id_problems(torch.arange(75)) == [75, 76]


def test_finalize_converts_and_never_mutates():
    opts = SaveOptions(dtype="fp16")
    src = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    out = finalize_tensor("model.diffusion_model.w", src, opts)
    assert out.dtype == torch.float16 and out.tolist() == [1.0, 2.0, 3.0]
    assert src.dtype == torch.float32
    ints = torch.tensor([1, 2])
    assert finalize_tensor("model.ids", ints, opts).dtype == torch.int64
    f8 = torch.tensor([1.0]).to(torch.float8_e5m2)
    assert finalize_tensor("model.f8", f8, opts).dtype == torch.float16  # fp8 inputs take the chosen dtype
    nc = torch.arange(6.0).reshape(2, 3).t()
    assert finalize_tensor("betas", nc, opts).is_contiguous()


def test_plan_and_finalize_agree_through_stream_writer(tmp_path):
    """The engine's streaming path end to end: plan header, finalize each tensor, write, read back."""
    tensors = {
        k: torch.ones(s, dtype=d) if d != torch.float8_e4m3fn else torch.ones(s).to(d) for k, d, s in sd1_entries()
    }
    vae_path = make_vae(tmp_path, False)
    opts = SaveOptions(dtype="fp16", prune=True, bake_vae=vae_path, reset_clip_ids=True)
    out = tmp_path / "final.safetensors"
    with open_vae(opts) as vae:
        plan = plan_output(entries_of(tensors), False, opts, vae)
        with atomic_output(out) as tmp, SafetensorsStreamWriter(tmp, plan, {"format": "pt"}) as w:
            for key, _, _ in plan:
                w.write(key, finalize_tensor(key, tensors[key], opts, vae))
    loaded = load_file(str(out))
    assert list(loaded) == [k for k, _, _ in plan] or set(loaded) == {k for k, _, _ in plan}
    assert torch.equal(loaded["first_stage_model.decoder.conv_in.weight"], torch.full((2, 2), 7.0, dtype=torch.float16))
    assert loaded["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    assert "betas" not in loaded and "model_ema.decay" not in loaded


# ---------------------------------------------------------------------------------------------------------------
# metadata and names


def test_merge_metadata_shape():
    recipe = json.dumps({"type": "block-merger", "alpha": 0.5})
    meta = merge_metadata(recipe, [("a.safetensors", "aa" * 32, "1234abcd"), ("b.ckpt", "bb" * 32, "NOFILE")])
    assert set(meta) == {"format", "sd_merge_recipe", "sd_merge_models"}
    assert meta["format"] == "pt" and meta["sd_merge_recipe"] == recipe
    assert json.loads(meta["sd_merge_models"]) == {
        "aa" * 32: {"name": "a.safetensors", "legacy_hash": "1234abcd"},
        "bb" * 32: {"name": "b.ckpt", "legacy_hash": "NOFILE"},
    }
    assert all(isinstance(v, str) for v in meta.values())


def test_merge_metadata_inherits_parents():
    grand = {"cc" * 32: {"name": "c.safetensors", "legacy_hash": "cccccccc", "sd_merge_recipe": None}}
    parent_meta = {"sd_merge_recipe": json.dumps({"type": "webui"}), "sd_merge_models": json.dumps(grand)}
    meta = merge_metadata(
        "{}",
        [("a.safetensors", "aa" * 32, "11111111", parent_meta), ("b.safetensors", "bb" * 32, "22222222", {})],
    )
    tree = json.loads(meta["sd_merge_models"])
    assert tree == {
        "aa" * 32: {"name": "a.safetensors", "legacy_hash": "11111111", "sd_merge_recipe": {"type": "webui"}},
        "bb" * 32: {"name": "b.safetensors", "legacy_hash": "22222222"},
        "cc" * 32: grand["cc" * 32],
    }


def test_merge_metadata_ignores_broken_parent_json_and_direct_input_wins():
    meta = merge_metadata(
        "{}",
        [
            ("a", "aa", "1", {"sd_merge_models": "{not json"}),
            ("b", "bb", "2", {"sd_merge_models": json.dumps({"aa": {"name": "old a", "legacy_hash": "x"}})}),
        ],
    )
    tree = json.loads(meta["sd_merge_models"])
    assert tree == {"aa": {"name": "a", "legacy_hash": "1"}, "bb": {"name": "b", "legacy_hash": "2"}}


@pytest.mark.parametrize(
    "merge_name,dtype,channels,ext,expected",
    [
        ("modelA + modelB", "keep", 4, ".safetensors", "modelA+modelB.safetensors"),
        ("a (0.5), b", "fp16", 4, "safetensors", "a_0.5__b.fp16.safetensors"),
        ("(x)", "fp32", 4, ".ckpt", "x_.ckpt"),
        ("inp", "fp16", 9, ".safetensors", "inp.fp16-inpainting.safetensors"),
        ("ip", "keep", 8, ".ckpt", "ip-instruct-pix2pix.ckpt"),
        ("sub/dir\\name", "keep", 4, ".safetensors", "sub_dir_name.safetensors"),
        ("..hidden", "keep", 4, ".safetensors", "hidden.safetensors"),
        ("   ", "keep", 4, ".safetensors", "merged.safetensors"),
    ],
)
def test_default_output_name(merge_name, dtype, channels, ext, expected):
    assert default_output_name(merge_name, dtype, channels, ext) == expected


def test_default_output_name_is_cut():
    name = default_output_name("x" * 400, "fp16", 9, ".safetensors")
    assert name == "x" * (240 - len(".fp16-inpainting")) + ".fp16-inpainting.safetensors"
    assert len(name) == 240 + len(".safetensors")
    jp = default_output_name("名" * 200, "keep", 4, ".ckpt")  # 3 UTF-8 bytes each
    stem = jp[: -len(".ckpt")]
    assert stem == "名" * 80 and len(stem.encode()) == 240


@pytest.mark.parametrize("bad", ["", "   ", "a/b", "a\\b", "../x", "x..y", "a\0b", ".hidden", "..", None])
def test_validate_custom_name_refuses(bad):
    with pytest.raises(MergeError):
        validate_custom_name(bad)


def test_validate_custom_name_accepts():
    assert validate_custom_name("  my merge v1.5  ") == "my merge v1.5"
    assert validate_custom_name("名前-model_2.safetensors") == "名前-model_2.safetensors"


def test_validate_custom_name_messages():
    with pytest.raises(MergeError, match="separator"):
        validate_custom_name("a/b")
    with pytest.raises(MergeError, match="empty"):
        validate_custom_name("")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_streaming_reads_do_not_grow_resident_memory(tmp_path):
    """Reading every tensor once must not keep the file mapped: RSS stays far below the file size."""
    # 160 MiB in 40 MiB tensors: above glibc's largest mmap threshold, so freed buffers really go back to the OS.
    # Control measurement: safetensors.torch.load_file (a kept mmap) grows RSS by the whole file here.
    n_tensors, per = 4, 40 * 1024 * 1024
    path = tmp_path / "big.safetensors"
    entries = [(f"t{i}", torch.uint8, (per,)) for i in range(n_tensors)]
    with SafetensorsStreamWriter(path, entries) as w:
        block = torch.full((per,), 7, dtype=torch.uint8)
        for key, _, _ in entries:
            w.write(key, block)
    del block
    with open_checkpoint(path) as ck:
        ck.get("t0")  # warm up allocator
        before = _rss_bytes()
        for key in ck.keys():
            t = ck.get(key)
            assert t[-1].item() == 7
            del t
        grown = _rss_bytes() - before
    assert grown < per + per // 2, f"resident memory grew by {grown / 2**20:.0f} MiB"
