"""smoothAdd's smoothing: scipy (the seed) against lib_merge.core.smoothing, in ns per element.

    python bench/smooth_speed.py                  # the five reference shapes, 1 and 2 threads
    python bench/smooth_speed.py --threads 1      # one thread count only
    python bench/smooth_speed.py --model          # every distinct SD1.5 shape, timed once, weighted by its count
    python bench/smooth_speed.py --clock cpu --threads 1   # CPU time: steadier when other jobs share the machine

Times are best of --repeat runs, wall clock by default; the seed column is always single-threaded scipy (as the seed
runs). Other jobs on the machine change wall-clock numbers: compare the ratios of one run, and rerun; with --clock cpu
the process's CPU time is measured instead, which for one thread is the work done whatever the load (for several
threads it is their total, showing the threading overhead, not the speed-up). `median` compares
scipy.ndimage.median_filter with median3; `smooth` compares the whole gaussian(median(x)) with smoothing.smooth.
Every result is checked bit for bit against scipy's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib_merge.core import smoothing  # noqa: E402

SHAPES = [(320, 320, 3, 3), (640, 640, 3, 3), (1280, 1280, 3, 3), (1280, 1280), (49408, 768)]


CLOCK = time.perf_counter


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def seed_smooth(x: np.ndarray) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(x, size=3), sigma=1)


def time_shape(shape, threads_list, repeat, rng) -> dict:
    x = rng.standard_normal(shape).astype(np.float32) * 0.01
    xt = torch.from_numpy(x)
    n = x.size
    ref_median = scipy.ndimage.median_filter(x, size=3)
    ref_smooth = scipy.ndimage.gaussian_filter(ref_median, sigma=1)
    row = {"shape": shape, "scipy_median": best(lambda: scipy.ndimage.median_filter(x, size=3), repeat) / n,
           "scipy_smooth": best(lambda: seed_smooth(x), repeat) / n}
    for threads in threads_list:
        torch.set_num_threads(threads)
        got_m = smoothing.median3(xt).numpy()
        got_s = smoothing.smooth(xt).numpy()
        if not (np.array_equal(got_m.view(np.uint32), ref_median.view(np.uint32))
                and np.array_equal(got_s.view(np.uint32), ref_smooth.view(np.uint32))):
            raise SystemExit(f"MISMATCH with scipy for {shape}")
        row[f"median3_{threads}"] = best(lambda: smoothing.median3(xt), repeat) / n
        row[f"smooth_{threads}"] = best(lambda: smoothing.smooth(xt), repeat) / n
    return row


def print_rows(rows, threads_list):
    head = f"{'shape':>18} {'scipy med':>10}" + "".join(f" {'med3 ' + str(t) + 't':>9} {'x':>6}" for t in threads_list)
    head += f" {'scipy smooth':>12}" + "".join(f" {'smooth ' + str(t) + 't':>9} {'x':>6}" for t in threads_list)
    print(head + "   (ns/element, x = speedup over single-threaded scipy)")
    for r in rows:
        line = f"{'x'.join(map(str, r['shape'])):>18} {r['scipy_median'] * 1e9:10.1f}"
        for t in threads_list:
            line += f" {r[f'median3_{t}'] * 1e9:9.1f} {r['scipy_median'] / r[f'median3_{t}']:6.1f}"
        line += f" {r['scipy_smooth'] * 1e9:12.1f}"
        for t in threads_list:
            line += f" {r[f'smooth_{t}'] * 1e9:9.1f} {r['scipy_smooth'] / r[f'smooth_{t}']:6.1f}"
        print(line, flush=True)


def sd15_shapes() -> Counter:
    data = json.loads((ROOT / "lib_merge" / "data" / "sd1-ldm.json").read_text())
    shapes = Counter()
    for keys in data["components"].values():
        for meta in keys.values():
            if meta["dtype"] in ("float32", "float16", "bfloat16") and len(meta["shape"]) >= 1:
                shapes[tuple(meta["shape"])] += 1
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", action="store_true", help="every SD1.5 shape once, totals weighted by key count")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}; torch {torch.__version__}, {torch.get_num_threads()} torch threads by default")
    rng = np.random.default_rng(0)
    if not args.model:
        rows = []
        for shape in SHAPES:
            rows.append(time_shape(shape, args.threads, args.repeat, rng))
        print_rows(rows, args.threads)
        return
    shapes = sd15_shapes()
    total = {"scipy_smooth": 0.0, **{f"smooth_{t}": 0.0 for t in args.threads}}
    elements = 0
    for shape, count in sorted(shapes.items(), key=lambda kv: -math.prod(kv[0]) * kv[1]):
        row = time_shape(shape, args.threads, 1, rng)
        n = math.prod(shape) * count
        elements += n
        for key in total:
            total[key] += row[key] * n
        print(f"{'x'.join(map(str, shape)):>18} x{count:<4} scipy {row['scipy_smooth'] * 1e9:8.1f} ns"
              + "".join(f"  {t}t {row[f'smooth_{t}'] * 1e9:7.1f} ns" for t in args.threads), flush=True)
    print(f"SD1.5, {elements / 1e6:.0f} M elements: seed (scipy, 1 thread) {total['scipy_smooth']:.1f} s"
          + "".join(f"; smoothing.smooth {t} thread(s) {total[f'smooth_{t}']:.1f} s "
                    f"({total['scipy_smooth'] / total[f'smooth_{t}']:.1f}x)" for t in args.threads))


if __name__ == "__main__":
    main()
