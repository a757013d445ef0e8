"""Elementwise merges stream large tensors through cache-sized pieces (engine.PIECE elements at a time).

The expectations are the spec's formulas in float64 (from test_formulas), so a piece boundary that read the wrong
span, skipped a tail or mixed keys shows as a wrong value. PIECE is shrunk to a few elements (not a multiple of
any vector width) so the tiny models' tensors are cut into many pieces; one test keeps the real size and reads a
tensor larger than a piece from a safetensors file.
"""

from __future__ import annotations

import pytest
import torch
from conftest import UNET, assert_rounded, assert_same, merge, randn, sd1_model, selected
from safetensors.torch import save_file
from test_formulas import (
    MODES,
    cosine_expected,
    normal_expected,
    smooth_expected,
    three,
    train_difference_expected,
)

from lib_merge.core import engine
from lib_merge.core.engine import DictSink, Models, TensorSink, plan_merge, run_merge
from lib_merge.core.recipe import Recipe
from lib_merge.io.checkpoint import open_checkpoint

BIG = UNET + "input_blocks.5.0.in_layers.2.weight"


@pytest.fixture
def tiny_pieces(monkeypatch):
    monkeypatch.setattr(engine, "PIECE", 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
def test_normal_modes_in_small_pieces(tiny_pieces, dtype, mode):
    a, b, c = three(dtype)
    uses_c = mode != "Weight sum"
    _, state = merge(a, b, c if uses_c else None, mode=mode, alpha=0.35, beta=0.2)
    for key in a:
        if selected(key, b, c if uses_c else None):
            exp = normal_expected(mode, a[key], b[key], c[key] if uses_c else None, 0.35, 0.2)
            assert_rounded(state[key], exp, dtype, what=f"{mode} {key}")
        else:
            assert_same(state[key], a[key], key)


@pytest.mark.parametrize("calc", ["cosineA", "cosineB"])
@pytest.mark.parametrize("piece", [7, 150], ids=["one row", "rows"])
def test_cosine_in_pieces_of_whole_rows(monkeypatch, calc, piece):
    """Cosine ratios are per column (dim 0), so pieces hold whole rows: 1 or 2 rows of a 3x3 conv, 18 of a matrix."""
    monkeypatch.setattr(engine, "PIECE", piece)
    a = sd1_model(11, torch.float16)
    b = sd1_model(12, torch.float16, base=a, noise=0.4)
    _, state = merge(a, b, calc=calc, alpha=0.3)
    expected = cosine_expected(calc, a, b, 0.3)
    assert BIG in expected
    for key in a:
        if key in expected:
            assert_rounded(state[key], expected[key], torch.float16, ulps=1, atol=1e-5, what=f"{calc} {key}")
        else:
            assert_same(state[key], a[key], key)


def test_self_in_small_pieces(tiny_pieces):
    a = sd1_model(3, torch.float16)
    _, state = merge(a, mode="Weight sum", calc="self", alpha=0.6)
    key = UNET + "input_blocks.3.0.op.weight"
    assert_rounded(state[key], a[key].double() * 0.6, torch.float16, what=key)


def test_train_difference_in_small_pieces(tiny_pieces):
    a, b, c = three(torch.float16)
    mixed = BIG  # 576 elements: B equals C in the first pieces only
    b[mixed].view(-1)[:20] = c[mixed].view(-1)[:20]
    _, state = merge(a, b, c, mode="Add difference", calc="trainDifference", alpha=0.5)
    for key in a:
        if selected(key, b, c):
            assert_rounded(state[key], train_difference_expected(a[key], b[key], c[key], 0.5), torch.float16,
                           what=key)


def test_train_difference_keeps_a_only_where_b_equals_c_over_the_whole_tensor(tiny_pieces):
    """A tensor where B equals C keeps A bit for bit (even -0.0); where B equals C only in some pieces, those are
    computed by the formula like the rest, and -0.0 + 0 gives +0.0 there (IEEE), as the seed's per-key kernel does."""
    a, b, c = three(torch.float16)
    same, mixed = UNET + "input_blocks.3.0.op.weight", BIG
    c[same] = b[same].clone()
    c[mixed].view(-1)[:14] = b[mixed].view(-1)[:14]  # the first two pieces of 7 have B == C
    for key in (same, mixed):
        a[key].view(-1)[3] = -0.0
        b[key].view(-1)[3] = c[key].view(-1)[3] = 0.25
    _, state = merge(a, b, c, mode="Add difference", calc="trainDifference", alpha=0.5)
    assert_same(state[same], a[same], same)
    assert state[same].view(-1)[3].item() == 0 and torch.signbit(state[same].view(-1)[3])
    got = state[mixed].view(-1)[3]
    assert got.item() == 0 and not torch.signbit(got)
    assert_rounded(state[mixed], train_difference_expected(a[mixed], b[mixed], c[mixed], 0.5), torch.float16,
                   what=mixed)


def _write(folder, name, state):
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _near(model, seed):
    """A fine-tune of `model`: every float tensor plus a little noise."""
    return {k: (v.double() + randn(v.shape, seed + i, torch.float64) * 0.1).to(v.dtype) if v.is_floating_point()
            else v for i, (k, v) in enumerate(model.items())}


def test_files_with_a_tensor_larger_than_one_piece(tmp_path):
    """Real piece size, real positional reads: a 3-piece tensor and its neighbours come out right."""
    numel = engine.PIECE * 2 + 12345
    a = sd1_model(5, torch.float16)
    a[BIG] = randn((numel,), 50, torch.float16)
    b, c = _near(a, 60), _near(a, 90)
    paths = [_write(tmp_path, n, m) for n, m in (("A", a), ("B", b), ("C", c))]
    recipe = Recipe("A", "B", "C", mode="Add difference", alpha=0.7)
    with open_checkpoint(paths[0]) as fa, open_checkpoint(paths[1]) as fb, open_checkpoint(paths[2]) as fc:
        models = Models(fa, fb, fc)
        state = run_merge(plan_merge(recipe, models), models, DictSink(), threads=2)
    for key in a:
        if selected(key, b, c):
            assert_rounded(state[key], normal_expected("Add difference", a[key], b[key], c[key], 0.7, 0),
                           torch.float16, what=key)
        else:
            assert_same(state[key], a[key], key)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode,calc", [("Weight sum", "normal"), ("Add difference", "normal"),
                                       ("Add difference", "smoothAdd")], ids=["ws", "ad", "smooth-whole-keys"])
def test_fp16_files_into_fp32_tensors_give_the_fp16_merge_widened(tmp_path, tiny_pieces, threads, mode, calc):
    """Merging fp16 files into an fp32 model (the WebUI on a CPU): every key holds exactly what loading the merged
    fp16 file gives, so each merged value is rounded to fp16 once and then widened, piece by piece (normal) and
    for whole keys (smoothAdd); copied keys are cast, not reinterpreted bytes. Computing straight into fp32 would
    leave values fp16 cannot hold."""
    a = sd1_model(7, torch.float16)
    b = sd1_model(8, torch.float16, base=a)
    c = sd1_model(9, torch.float16, base=a)
    uses_c = mode != "Weight sum"
    paths = [_write(tmp_path, n, m) for n, m in (("A", a), ("B", b), ("C", c))]
    live = {k: torch.zeros(v.shape, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in a.items()}
    recipe = Recipe("A", "B", "C" if uses_c else "", mode=mode, calc=calc, alpha=0.4)
    with open_checkpoint(paths[0]) as fa, open_checkpoint(paths[1]) as fb, open_checkpoint(paths[2]) as fc:
        models = Models(fa, fb, fc if uses_c else None)
        run_merge(plan_merge(recipe, models), models, TensorSink(live), threads=threads)
    merged = 0
    for key in a:
        if not selected(key, b, c if uses_c else None):
            assert torch.equal(live[key], a[key].to(live[key].dtype)), key
            continue
        merged += 1
        assert live[key].dtype == torch.float32, key
        assert torch.equal(live[key], live[key].half().float()), f"{key}: values fp16 cannot hold"
        if calc == "smoothAdd":
            expected, ulps = smooth_expected(a[key], b[key], c[key], 0.4), 1
        else:  # one rounding of the exact value: the nearest fp16
            expected = normal_expected(mode, a[key], b[key], c[key] if uses_c else None, 0.4, 0).half().double()
            ulps = 0
        assert_rounded(live[key].half(), expected, torch.float16, ulps=ulps, atol=0 if ulps == 0 else 1e-6,
                       what=key)
    assert merged >= 20


@pytest.mark.parametrize("start,stop", [(-1, 3), (5, 4), (0, 10**9)])
def test_span_outside_the_tensor_is_refused(tmp_path, start, stop):
    a = sd1_model(1, torch.float16)
    path = _write(tmp_path, "A", a)
    with open_checkpoint(path) as f, pytest.raises(IndexError, match="outside"):
        f.get_span(BIG, start, stop)


def test_span_reads_the_right_elements(tmp_path):
    a = sd1_model(2, torch.float16)
    path = _write(tmp_path, "A", a)
    flat = a[BIG].reshape(-1)
    with open_checkpoint(path) as f:
        assert_same(f.get_span(BIG, 100, 131), flat[100:131], "span")
        buffer = torch.empty(1000, dtype=torch.uint8)
        assert_same(f.get_span(BIG, 0, 5, out=buffer), flat[:5], "span into a buffer")
        assert f.get_span(BIG, 7, 7).numel() == 0


def test_read_span_writes_exactly_the_stored_bytes(tmp_path):
    """`read_span` (the merge's piece reads) fills exactly the bytes given, and refuses a buffer of another size."""
    a = sd1_model(3, torch.float16)
    path = _write(tmp_path, "A", a)
    flat = a[BIG].reshape(-1)
    with open_checkpoint(path) as f:
        buffer = torch.full((64,), 7, dtype=torch.uint8)
        f.read_span(BIG, 10, 30, memoryview(buffer.numpy())[:40])
        assert_same(buffer[:40].view(torch.float16), flat[10:30], "span bytes")
        assert torch.all(buffer[40:] == 7)  # nothing written past the span
        with pytest.raises(ValueError, match="cannot hold"):
            f.read_span(BIG, 10, 30, memoryview(buffer.numpy()))
        with pytest.raises(IndexError, match="outside"):
            f.read_span(BIG, 0, 10**9, memoryview(buffer.numpy()))
