"""Exact size-3 median filter and the smoothAdd smoothing, bit-identical to scipy but much faster.

``median3(x)`` equals ``scipy.ndimage.median_filter(x, size=3)`` (every axis, mode 'reflect') value for value, and
``smooth(x)`` equals ``scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(x, size=3), sigma=1)`` bit for bit
(the gaussian is scipy's own, run in bands of rows when threads are given; after the median's speed-up it is about a
quarter of smooth's time on convolutions and most of it on matrices).

How the median is computed
--------------------------
A median only selects one of the window's values, so any exact selection algorithm returns the same bits. We use
comparator networks: every step is ``numpy.minimum`` / ``numpy.maximum`` of two whole arrays (one value per output
position), so the work is vectorised and intermediate results are shared between overlapping windows. (numpy, not
torch: a ufunc call costs ~0.5 us against torch's ~1.7 us, never starts intra-op threads, and releases the GIL.)

1. Edges. With a window of 3, scipy's 'reflect' (d c b a | a b c d | d c b a) only ever reads one sample beyond the
   edge, which is the edge sample itself: padding by edge replication is identical, for axes of length 1 and 2 too.
2. Axes of length 1 are dropped: such an axis repeats every window value three times, and the median of a multiset of
   n (odd) values each taken three times is the median of the n values (rank (3n+1)/2 falls in the (n+1)/2-th triple).
3. The two longest axes are the "outer" axes; the other (short) axes are "channels". For an SD convolution
   [out, in, 3, 3] the 9 kernel taps are 9 planes of shape [out, in]; the window of output tap (k, l) over the
   kernel axes is a fixed multiset of taps (at the kernel's edge, with repeats), so each output tap first gets the
   sorted list S of its window's taps (the "inner" list, 9 values for a 3x3 kernel) at every [out, in] position.
4. The outer 3x3 window of an output is then the union of nine inner lists S. With sorted lists as building blocks:
   * pairs of neighbouring columns are merged once and shared by the two outputs that contain both (Pm);
   * adding the third column gives V, the sorted list of one row of the window (3 inner lists);
   * two neighbouring rows are merged once for the two outputs that contain both (Q); of Q only the ranks that can
     still be the median are kept (see ``_trunc``);
   * the median is the k-th smallest of Q and the output's own third row V: ``min over a+b=k of max(Q_a, V_b)``.
   For a 3x3 kernel this is ~8000 array ops per chunk, about 316 element-operations per output element (inner lists
   32, column pairs 30, rows 110, row pairs 90, final selection 54), against scipy's sort of 81 values per element.
   Merging uses Batcher's odd-even merge (a sorting network, so exact with ties); pairs are shared by computing them
   at every other position (the arrays are split by the parity of the position, "polyphase", so that every operand is
   a plain slice).
5. Dead code (comparators whose outputs no median depends on) is removed before anything runs.

Why this is exact: merges and the k-th-smallest formula are exact for any values including ties (a sorting network
sorts any multiset; for ``min over a+b=k of max(A_a, B_b)``: every split bounds the k-th smallest from above, and the
split holding the k smallest elements attains it). ``_trunc`` only drops list entries that provably rank strictly
below or above the target (proof at ``_trunc``). tests/test_smoothing.py checks bit equality against scipy.

Arrays are processed in chunks of rows of the first outer axis (with a one-row halo), about 64K positions each (the
~175 live arrays, ~25 MB, stay in the L3 cache; measured best between 48K and 100K positions). A worker (one per
thread in use, kept between calls) owns those buffers and, per chunk geometry, a program: the op list with every view
made once; so nothing is allocated per chunk and little per tensor. Threads split the chunks; the gaussian is split
into bands of rows (see ``_gaussian``).

NaN: inputs are assumed NaN-free (scipy's own result with NaNs depends on its selection order). Signed zeros compare
equal, so where a window's median is zero and it holds both +0.0 and -0.0 the sign may differ from scipy's.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import scipy.ndimage
import torch

# Chunks aim at about this many outer positions per op (rows x columns); a few hundred arrays of this size are live.
_TARGET_POSITIONS = 1 << 16
_MAX_CHANNELS = 64  # more (unusually shaped tensors with three or more long axes) goes to scipy, identical anyway
_GAUSS_MARGIN = 4  # rows read either side by scipy's gaussian: int(truncate 4.0 * sigma 1 + 0.5)
_GAUSS_BAND = 1 << 18  # fewest elements per gaussian band
_MAX_IDLE_WORKERS = 4  # kept by a Workers pool between calls; more concurrent workers are dropped after use
_PROGRAMS_PER_WORKER = 8  # programs are views into the worker's buffers (~8 MB of Python objects each)

# ------------------------------------------------------------------------------------------------ symbolic networks
# A ref is (node id, view chain); a view chain is a tuple of view tokens applied to the node's 1-D array. Every array
# is 1-D and every view a contiguous slice of it (fast, single-threaded numpy ufuncs): the chunk's padded outer plane,
# R+2 rows by n1+2 columns (row/column x = 2s + px, y = 2t + py), is stored split by the parities of both positions
# ("polyphase"), block [py][px] holding [Xh rows s][Tq columns t], Xh = R/2 + 1, Tq = ceil((n1+2)/2). Shifting by one
# column or row of the same parity is then an offset of 1 or Tq, and positions past a row's end hold garbage that no
# output reads. Domains (array lengths):
#   'P'  2*2*Xh*Tq  the plane, leaves and the channels' inner lists
#   'C'  2*Xh*Tq    per padded row (both row parities) and output column pair t: column pairs Pm and rows V
#   'Q'  Rh*Tq      per output row pair s (Rh = R/2) and column pair t: row pairs Q and the medians
# Views: ('col', py, dt) = plane columns 2(t+dt)+py as a 'C' array; ('row', px, ds) = rows 2(s+ds)+px as a 'Q' array.


class _Net:
    def __init__(self):
        self.nodes: list[tuple] = []  # (kind, ref_a, ref_b, domain); kind 'leaf' has ref_a = channel index
        self.index: dict[tuple, int] = {}

    def leaf(self, channel: int):
        self.nodes.append(("leaf", channel, None, "P"))
        return (len(self.nodes) - 1, ())

    def op(self, kind: str, a, b, domain):
        if a == b:
            return a
        if b < a:
            a, b = b, a
        key = (kind, a, b)
        node = self.index.get(key)
        if node is None:
            node = len(self.nodes)
            self.nodes.append((kind, a, b, domain))
            self.index[key] = node
        return (node, ())

    def merge(self, a: list, b: list, domain) -> list:
        """Batcher's odd-even merge of two sorted lists (any lengths)."""
        if not a:
            return list(b)
        if not b:
            return list(a)
        if len(a) == 1 and len(b) == 1:
            return [self.op("min", a[0], b[0], domain), self.op("max", a[0], b[0], domain)]
        even = self.merge(a[0::2], b[0::2], domain)
        odd = self.merge(a[1::2], b[1::2], domain)
        out, rest = [even[0]], even[1:]
        for i in range(max(len(odd), len(rest))):
            if i < len(odd) and i < len(rest):
                out += [self.op("min", odd[i], rest[i], domain), self.op("max", odd[i], rest[i], domain)]
            else:
                out.append(odd[i] if i < len(odd) else rest[i])
        return out

    def merge_multiset(self, lists: list[list], domain) -> list:
        """Sorted union of sorted lists; a list given several times is repeated in place (no comparisons)."""
        counts: dict[tuple, int] = {}
        for lst in lists:
            counts[tuple(lst)] = counts.get(tuple(lst), 0) + 1
        parts = [[r for r in lst for _ in range(n)] for lst, n in counts.items()]
        out = parts[0]
        for part in parts[1:]:
            out = self.merge(out, part, domain)
        return out

    def select(self, a: list, b: list, k: int, domain):
        """k-th smallest (1-based) of the union of sorted a and b: min over i+j=k of max(a_i, b_j)."""
        result = None
        for i in range(k + 1):
            j = k - i
            if i > len(a) or j > len(b):
                continue
            term = b[j - 1] if i == 0 else a[i - 1] if j == 0 else self.op("max", a[i - 1], b[j - 1], domain)
            result = term if result is None else self.op("min", result, term, domain)  # folded at once: few live
        return result


def _trunc(lst: list, k: int, rest: int) -> tuple[list, int]:
    """Keep the entries of sorted `lst` that can be the k-th smallest of lst plus `rest` values not yet merged.

    Entry i (1-based) has between i-1 and i-1+rest values below it, so only k-1-rest < i <= k can be the k-th.
    Proof that dropping the others keeps the k-th value v (ties included): with d = k-1-rest > 0, if lst_d > v then
    at most d-1+rest = k-2 values are <= v, impossible; so the dropped low entries are <= v, and of them the ones < v
    are all of lst's values < v, so what remains has at most rest = k-1-d values < v and still >= k-d values <= v:
    v is its (k-d)-th. Symmetrically lst_i < v for an i > k would put k values below v, so the dropped high entries
    are >= v, and removing them keeps < k values below v and >= k values <= v (if one equals v, lst_k <= v).
    """
    lo = max(0, k - 1 - rest)
    return lst[lo:k], k - lo


def _view(ref, token):
    return (ref[0], ref[1] + (token,))


def _window(length: int, t: int) -> tuple[int, int, int]:
    return (max(t - 1, 0), t, min(t + 1, length - 1))


def _build(inner: tuple[int, ...]):
    """The network for outer-2-D windows with the given channel (inner) shape: (net, outputs).

    outputs: list of (channel, px, py, ref); the ref's 'Q' array holds the medians of that channel at the output rows
    2s+px and columns 2t+py.
    """
    net = _Net()
    channels = math.prod(inner)
    leaves = [net.leaf(c) for c in range(channels)]
    strides = [math.prod(inner[j + 1:]) for j in range(len(inner))]
    memo: dict = {}

    def inner_sorted(prefix: int, axis: int, out_pos: tuple) -> list:
        """Sorted values of the window of output position out_pos over inner axes >= axis (flat prefix given)."""
        if axis == len(inner):
            return [leaves[prefix]]
        key = (prefix, axis, out_pos[axis:])
        if key not in memo:
            parts = [inner_sorted(prefix + p * strides[axis], axis + 1, out_pos)
                     for p in _window(inner[axis], out_pos[axis])]
            memo[key] = net.merge_multiset(parts, "P")
        return memo[key]

    outputs = []
    for ch, out_pos in enumerate(np.ndindex(*inner) if inner else [()]):
        s = inner_sorted(0, 0, tuple(out_pos))
        k = (9 * len(s) + 1) // 2
        # columns: the pair 2t+1, 2t+2 is shared by output columns 2t (window 2t..2t+2) and 2t+1 (2t+1..2t+3)
        pair = net.merge([_view(r, ("col", 1, 0)) for r in s], [_view(r, ("col", 0, 1)) for r in s], "C")
        for py, col in ((0, ("col", 0, 0)), (1, ("col", 1, 1))):
            v = net.merge(pair, [_view(r, col) for r in s], "C")  # the window's row: columns 2t+py..2t+py+2
            # rows: the pair 2s+1, 2s+2 is shared by output rows 2s and 2s+1, which add rows 2s and 2s+3
            q = net.merge([_view(r, ("row", 1, 0)) for r in v], [_view(r, ("row", 0, 1)) for r in v], "Q")
            q, kq = _trunc(q, k, len(v))
            outputs.append((ch, 0, py, net.select(q, [_view(r, ("row", 0, 0)) for r in v], kq, "Q")))
            outputs.append((ch, 1, py, net.select(q, [_view(r, ("row", 1, 1)) for r in v], kq, "Q")))
    return net, outputs


class _Schedule:
    """The network of a channel shape, reduced to what the medians need and laid out on numbered buffers.

    Geometry-independent: ops are (fn name, operand a, operand b, out slot) with operands (slot, view chain) and slots
    (domain, index) or ('leaf', channel); a dying operand viewed whole is overwritten in place, and other buffers are
    reused once dead, so about 175 buffers serve the ~8000 ops of a 3x3-kernel convolution.
    """

    def __init__(self, inner: tuple[int, ...]):
        net, outputs = _build(inner)
        live, stack = set(), [ref[0] for *_, ref in outputs]
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                if net.nodes[n][0] != "leaf":
                    stack += [net.nodes[n][1][0], net.nodes[n][2][0]]
        order = sorted(live)
        last = {}
        for i, n in enumerate(order):
            kind, a, b, _ = net.nodes[n]
            if kind != "leaf":
                last[a[0]] = last[b[0]] = i
        for *_, ref in outputs:
            last[ref[0]] = len(order)
        slot: dict[int, tuple] = {}
        free: dict[str, list] = {"P": [], "C": [], "Q": []}
        self.counts = {"P": 0, "C": 0, "Q": 0}
        self.ops = []
        for i, n in enumerate(order):
            kind, a, b, domain = net.nodes[n]
            if kind == "leaf":
                slot[n] = ("leaf", a)
                continue
            out = None
            for ref in (a, b):
                if out is None and not ref[1] and last[ref[0]] == i and slot[ref[0]][0] != "leaf":
                    out = slot[ref[0]]
            if out is None:
                if free[domain]:
                    out = free[domain].pop()
                else:
                    out = (domain, self.counts[domain])
                    self.counts[domain] += 1
            self.ops.append((kind, (slot[a[0]], a[1]), (slot[b[0]], b[1]), out))
            slot[n] = out
            for m in {a[0], b[0]}:
                if last[m] == i and slot[m][0] != "leaf" and slot[m] != out:
                    free[slot[m][0]].append(slot[m])
        self.outputs = [(ch, px, py, (slot[ref[0]], ref[1])) for ch, px, py, ref in outputs]


_SCHEDULES: dict[tuple, _Schedule] = {}
_SCHEDULES_LOCK = threading.Lock()


def _schedule(inner: tuple[int, ...]) -> _Schedule:
    with _SCHEDULES_LOCK:
        if inner not in _SCHEDULES:
            _SCHEDULES[inner] = _Schedule(inner)
        return _SCHEDULES[inner]


# ------------------------------------------------------------------------------------------------ compiled programs


class _Arena:
    """One thread's buffers, grown on demand and shared by all its programs (one runs at a time)."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.generation = 0

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A C-contiguous array of `shape` (contents undefined) carved from the buffer `name`; growing a buffer
        (rare: wider tensors) bumps `generation`, as views of the old one are then stale."""
        size = math.prod(shape)
        buf = self.arrays.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.arrays[name] = np.zeros(size, dtype=dtype)
            self.generation += 1
        return buf[:size].reshape(shape)


class _Program:
    """A schedule instantiated for one chunk geometry on a thread's arena: the op list with all views made once.

    Chunks are R output rows (R even) of an [n0, n1, C] array; see the layout notes above the networks.
    """

    def __init__(self, sched: _Schedule, channels: int, rows: int, cols: int, dtype, arena: _Arena):
        self.rows, self.cols, self.channels = rows, cols, channels
        self.half_rows, self.tq = rows // 2 + 1, (cols + 3) // 2
        tq, block = self.tq, self.half_rows * self.tq
        lengths = {"P": 4 * block, "C": 2 * block, "Q": (rows // 2) * tq}
        # each buffer has one element of slack after its length, for the views shifted by one column
        pools = {d: arena.get(d, (sched.counts[d], lengths[d] + 1), dtype) for d in lengths}
        self.leaves = arena.get("leaves", (channels, lengths["P"] + 1), dtype)

        def view(operand, length):
            (dom, idx), tokens = operand
            t = self.leaves[idx] if dom == "leaf" else pools[dom][idx]
            for kind, par, d in tokens:
                t = t[par * 2 * block + d:] if kind == "col" else t[par * block + d * tq:]
            return t[:length]

        fns = {"min": np.minimum, "max": np.maximum}
        self.ops = []
        for kind, a, b, out in sched.ops:
            length = lengths[out[0]]
            self.ops.append((fns[kind], view(a, length), view(b, length), pools[out[0]][out[1]][:length]))
        self.outputs = [(ch, px, py, view(ref, lengths["Q"]).reshape(rows // 2, tq)[:, :(cols + 1 - py) // 2])
                        for ch, px, py, ref in sched.outputs]
        # gather: plane position [py, px, s, t] <- padded row 2s+px, padded column 2t+py (edges replicated)
        self.row_offsets = (np.arange(2)[:, None] + 2 * np.arange(self.half_rows)[None, :] - 1).reshape(-1)
        self.col_index = np.clip(np.arange(2)[:, None] + 2 * np.arange(tq)[None, :] - 1, 0, cols - 1).reshape(-1)
        self.gather_rows = arena.get("gather_rows", (2 * self.half_rows, cols, channels), dtype)
        self.gather = arena.get("gather", (2 * self.half_rows, 2 * tq, channels), dtype)
        self.generation = arena.generation

    def run(self, x: np.ndarray, y: np.ndarray, r0: int, keep: tuple[int, int]):
        """Medians of rows [r0, r0+R) of x [n0, n1, C] into y; only rows in [keep[0], keep[1]) are written."""
        np.take(x, np.clip(self.row_offsets + r0, 0, x.shape[0] - 1), axis=0, out=self.gather_rows)
        np.take(self.gather_rows, self.col_index, axis=1, out=self.gather)
        planes = self.leaves[:, :-1].reshape(self.channels, 2, 2, self.half_rows, self.tq)  # [c, py, px, s, t]
        planes[...] = self.gather.reshape(2, self.half_rows, 2, self.tq, self.channels).transpose(4, 2, 0, 1, 3)
        for fn, a, b, out in self.ops:
            fn(a, b, out=out)
        for ch, px, py, res in self.outputs:
            lo = max(0, (keep[0] - r0 - px + 1) // 2)  # first s with r0 + 2s + px >= keep[0]
            hi = min(res.shape[0], (keep[1] - r0 - px + 1) // 2)
            if hi > lo:
                y[r0 + px + 2 * lo:r0 + px + 2 * hi:2, py::2, ch] = res[lo:hi]


class _Worker:
    """Buffers (an arena) and the programs made on them; used by one thread at a time, kept between calls."""

    def __init__(self):
        self.arena = _Arena()
        self.programs: OrderedDict = OrderedDict()

    def program(self, inner: tuple[int, ...], rows: int, cols: int, dtype) -> _Program:
        key = (inner, rows, cols, np.dtype(dtype).str)
        prog = self.programs.get(key)
        if prog is None or prog.generation != self.arena.generation:
            # (a program's views die when the arena grows: `generation` tells)
            prog = _Program(_schedule(inner), math.prod(inner), rows, cols, dtype, self.arena)
            self.programs[key] = prog
            while len(self.programs) > _PROGRAMS_PER_WORKER:
                self.programs.popitem(last=False)
        self.programs.move_to_end(key)
        return prog


class Workers:
    """A pool of idle workers (buffers and programs) reused between calls: one per merge run, so consecutive keys
    reuse the same ~25 MB buffers instead of touching fresh memory; dropped with the pool."""

    def __init__(self, max_idle: int = _MAX_IDLE_WORKERS):
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._max_idle = max_idle

    def acquire(self) -> _Worker:
        with self._lock:
            return self._idle.pop() if self._idle else _Worker()

    def release(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(worker)


# ------------------------------------------------------------------------------------------------ public functions


def _median_planes(x: np.ndarray, inner: tuple[int, ...], threads: int, workers: Workers) -> np.ndarray:
    """Median of x [n0, n1, C] (C = prod(inner) channels, the flattened short axes); n0, n1 >= 2."""
    n0, n1, _ = x.shape
    rows = max(2, min(n0 + n0 % 2, _TARGET_POSITIONS // (n1 + 3) // 2 * 2))
    y = np.empty_like(x)
    # chunks of `rows` rows; the last one ends at the last row (its overlap with the previous one is not written)
    spans = [(min(r0, max(0, n0 - rows)), (r0, min(r0 + rows, n0))) for r0 in range(0, n0, rows)]
    threads = max(1, min(threads, len(spans)))

    def work(part):
        worker = workers.acquire()
        try:
            prog = worker.program(inner, rows, n1, x.dtype)
            for r0, keep in part:
                prog.run(x, y, r0, keep)
        finally:
            workers.release(worker)

    if threads == 1:
        work(spans)
    else:
        _in_threads(work, [(spans[i::threads],) for i in range(threads)])
    return y


def _in_threads(target, arguments: list[tuple]) -> None:
    """Run target(*args) for each args in its own thread (the GIL is released inside numpy/scipy); the first
    exception is re-raised in the caller's thread."""
    errors: list[BaseException] = []

    def guarded(*args):
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in arguments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _median_1d(x: np.ndarray) -> np.ndarray:
    a, c = np.concatenate([x[:1], x[:-1]]), np.concatenate([x[1:], x[-1:]])
    return np.maximum(np.minimum(a, x), np.minimum(np.maximum(a, x), c))


def _median_array(x: np.ndarray, threads: int, workers: Workers) -> np.ndarray:
    shape = x.shape
    if x.size == 0:
        return x.copy()
    core = x.reshape([n for n in shape if n > 1])  # length-1 axes dropped (see the module docstring)
    if core.ndim == 0:
        return x.copy()
    if core.ndim == 1:
        return _median_1d(core).reshape(shape)
    # the two longest axes are outer, the others are channels
    outer = sorted(sorted(range(core.ndim), key=lambda d: -core.shape[d])[:2])
    inner_axes = [d for d in range(core.ndim) if d not in outer]
    inner = tuple(core.shape[d] for d in inner_axes)
    if math.prod(inner) > _MAX_CHANNELS:
        return scipy.ndimage.median_filter(x, size=3)
    perm = outer + inner_axes
    moved = core.transpose(perm)
    planes = np.ascontiguousarray(moved).reshape(moved.shape[0], moved.shape[1], -1)
    result = _median_planes(planes, inner, threads, workers).reshape(moved.shape)
    return np.ascontiguousarray(result.transpose(np.argsort(perm))).reshape(shape)


def median3(x: torch.Tensor, threads: int | None = None, workers: Workers | None = None) -> torch.Tensor:
    """scipy.ndimage.median_filter(x, size=3) (mode 'reflect', every axis), exactly, as a new CPU tensor.

    threads: worker threads (default torch.get_num_threads()); pass 1 where the caller already runs one per core.
    workers: a pool to reuse buffers across calls (default: a fresh one for this call).
    fp16/bf16 are filtered in fp32 and rounded back, which is exact (the median is one of the values).
    """
    x = x.detach().cpu()
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    threads = torch.get_num_threads() if threads is None else threads
    result = torch.from_numpy(_median_array(x.numpy(), max(1, threads), workers or Workers()))
    return result.to(dtype) if result.dtype != dtype else result


def _gaussian(m: np.ndarray, threads: int) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(m, sigma=1), in `threads` bands of rows (scipy releases the GIL).

    Bit-identical: scipy filters axis 0 first, reading 4 rows either side (truncate 4 x sigma 1) in float64 with a
    fixed summation order, then each later axis within each row; so a band with 4 rows of margin each side (or the
    array's own edge, where 'reflect' then applies as before) gives exactly scipy's values for its own rows.
    """
    n0 = m.shape[0]
    threads = max(1, min(threads, n0 // 64, m.size // _GAUSS_BAND))  # small arrays: a thread costs more than it saves
    if threads == 1:
        return scipy.ndimage.gaussian_filter(m, sigma=1)
    out = np.empty_like(m)
    bounds = [n0 * i // threads for i in range(threads + 1)]
    def band(lo, hi):
        start, stop = max(0, lo - _GAUSS_MARGIN), min(n0, hi + _GAUSS_MARGIN)
        out[lo:hi] = scipy.ndimage.gaussian_filter(m[start:stop], sigma=1)[lo - start:hi - start]

    _in_threads(band, [(bounds[i], bounds[i + 1]) for i in range(threads)])
    return out


def smooth(x: torch.Tensor, threads: int | None = None, workers: Workers | None = None) -> torch.Tensor:
    """gaussian_filter(median_filter(x, size=3), sigma=1) in fp32, bit-identical to the scipy pipeline.

    threads, workers: as for median3.
    """
    x = x.detach().cpu().float()
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    threads = max(1, torch.get_num_threads() if threads is None else threads)
    return torch.from_numpy(_gaussian(_median_array(x.numpy(), threads, workers or Workers()), threads))
