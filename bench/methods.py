"""TIES and DARE over three full-size SD1.5 models (base A, models B and C): Block Merger against sd-mecha, wall time
and peak resident memory, one run each, every contender in its own process writing a .safetensors file.

    flock /work/bench-cache/.lock python bench/make_models.py      # the models, once (bench/cache)
    python bench/methods.py                                        # or --factor 8 for a quick run

Same parameters on both sides: TIES density/k 0.2 with the sign elected by mass (sd-mecha's vote_sgn=True), λ 1;
DARE drop probability 0.9, λ 1. sd-mecha's dropout averages the kept deltas over the models (its "n-supermario")
where DARE's paper, and we, sum them: the same work per key, not the same result. Peak memory is the child's ru_maxrss
(os.wait4); the 1-minute load average is printed beside each run, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_models import model_path  # noqa: E402

METHODS = {"ties": dict(density=0.2), "dare": dict(drop=0.9)}


def child(contender: str, method: str, paths: list[str], output: str) -> None:
    """Run one merge in this process."""
    if contender == "ours":
        from lib_merge.core.recipe import Recipe
        from lib_merge.service.pipeline import merge_to_file

        recipe = Recipe(paths[0], method=method, models=tuple(paths[1:]), alpha=1.0, seed=0, **METHODS[method])
        merge_to_file(recipe, output, overwrite=True, metadata=False)
        return
    import mecha_ref

    if method == "ties":
        mecha_ref.ties(*paths, alpha=1.0, k=0.2, output=output)
    else:
        mecha_ref.dare(*paths, alpha=1.0, probability=0.9, seed=0, output=output)


def measure(contender: str, method: str, paths: list[str], output: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", contender, method, "--output", str(output), *paths]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    log = proc.stdout.read()
    proc.stdout.close()
    output.unlink(missing_ok=True)
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"contender": contender, "method": method, "ok": ok, "seconds": round(seconds, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "load_before": round(load, 1),
            "error": "" if ok else log.strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor", type=int, default=1, help="model size divisor (bench/make_models.py --factor)")
    ap.add_argument("--methods", default="ties,dare")
    ap.add_argument("--contenders", default="ours,mecha")
    ap.add_argument("--workdir", default="/tmp", help="where the outputs are written (and removed)")
    ap.add_argument("--child", nargs=2, metavar=("CONTENDER", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.paths, args.output)
        return 0
    paths = [str(model_path("sd1", w, args.factor)) for w in ("A", "B", "C")]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"missing {missing}: run bench/make_models.py first", file=sys.stderr)
        return 2
    results = []
    for method in args.methods.split(","):
        for contender in args.contenders.split(","):
            out = Path(args.workdir) / f"bench-methods-{os.getpid()}-{contender}-{method}.safetensors"
            results.append(measure(contender, method, paths, out))
            print(json.dumps(results[-1]), flush=True)
    for method in args.methods.split(","):
        by = {r["contender"]: r for r in results if r["method"] == method and r["ok"]}
        if "ours" in by and "mecha" in by:
            print(f"{method}: sd-mecha / ours time {by['mecha']['seconds'] / by['ours']['seconds']:.2f}x, "
                  f"peak memory {by['mecha']['peak_rss_gb']:.2f} GB vs {by['ours']['peak_rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
