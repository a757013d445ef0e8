"""Flux-dev diffusion model merge to file: Block Merger against sd-mecha's streaming merge, in one run.

    python bench/flux.py --double 3 --single 6 --runs 2 --workdir bench/cache/flux

Two synthetic Flux-dev diffusion models (bf16, the real key names and full-size tensors from
../shared/model_layouts/flux-dev.json) are written one tensor at a time; `--double`/`--single` keep that many of the
19 double and 38 single blocks (every other key is kept), so the files can be a fraction of the 23.8 GB of a full
model when the disk cannot hold two of them and two outputs; each tensor still has its real size, so per-key
buffers are as large as at full size. Then Weight sum (alpha 0.5, bf16 out) is run by each contender in a fresh
process (order alternating, inputs read once before each run so both find them in the page cache, earlier writes
flushed): wall time around the merge, peak RSS from wait4's ru_maxrss. The input hashes our metadata records are
computed once before the runs (the WebUI caches them too). The outputs are compared key by key
(bit-identical expected: both compute lerp in fp32 and round once to bf16). Everything written is deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MARK = "@@FLUX@@ "
GB = 1e9
BLOCK = re.compile(r"\.(double|single)_blocks\.(\d+)\.")


def kept_specs(double: int, single: int) -> dict:
    """key -> (shape, dtype) of the Flux-dev diffusion model, full-size tensors, only the first blocks."""
    import torch

    from lib_merge.cli import synth

    specs = synth.layout_shapes("flux-dev", 1, torch.bfloat16, components=["diffuser"])
    limit = {"double": double, "single": single}
    out = {}
    for key, spec in specs.items():
        m = BLOCK.search(key)
        if m is None or int(m.group(2)) < limit[m.group(1)]:
            out[key] = spec
    return out


def write_models(workdir: Path, specs: dict) -> list[Path]:
    """Models A and B, one tensor at a time (peak memory: one tensor)."""
    from lib_merge.cli import synth

    paths = []
    for name, seed in (("A", 1), ("B", 2)):
        path = workdir / f"flux_{name}.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            synth.stream_checkpoint(path, specs,
                                    lambda key, s=seed: synth.make_tensor(key, specs[key][0], specs[key][1], s))
            print(f"wrote {path.name}: {path.stat().st_size / GB:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        paths.append(path)
    return paths


def child(spec: dict) -> dict:
    """One contender's merge, timed after its imports."""
    import resource

    import torch

    if spec["who"] == "ours":
        from lib_merge.core.recipe import Recipe
        from lib_merge.io.hashes import HashCache
        from lib_merge.io.save_options import SaveOptions
        from lib_merge.service.pipeline import merge_to_file

        t0 = time.perf_counter()
        merge_to_file(Recipe(spec["a"], spec["b"], alpha=0.5), spec["out"], SaveOptions(), overwrite=True,
                      metadata=True, hashes=HashCache(spec["hash_cache"]))
    else:
        import mecha_ref

        t0 = time.perf_counter()
        mecha_ref.weight_sum(spec["a"], spec["b"], alpha=0.5, output=spec["out"], output_dtype=torch.bfloat16)
    wall = time.perf_counter() - t0
    return {"time": wall, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def compare(ours: Path, theirs: Path) -> tuple[int, int, str]:
    """(keys, keys bit-identical, first differing key)."""
    import torch
    from safetensors import safe_open

    same, first = 0, ""
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        keys = sorted(set(a.keys()) & set(b.keys()))
        for key in keys:
            if torch.equal(a.get_tensor(key), b.get_tensor(key)):
                same += 1
            elif not first:
                first = key
    return len(keys), same, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=19, help="double blocks kept (of 19)")
    ap.add_argument("--single", type=int, default=38, help="single blocks kept (of 38)")
    ap.add_argument("--runs", type=int, default=2, help="runs per contender")
    ap.add_argument("--workdir", type=Path, default=BENCH / "cache" / "flux")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    from measure import _cpu_busy, _sync, _warm, run_subprocess

    specs = kept_specs(args.double, args.single)
    model_bytes = sum(s[1].itemsize * _numel(s[0]) for s in specs.values())
    full = kept_specs(19, 38)
    full_bytes = sum(s[1].itemsize * _numel(s[0]) for s in full.values())
    need = 4 * model_bytes * 1.02  # two inputs, two outputs while they are compared
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"{len(specs)} of {len(full)} keys ({args.double}/19 double, {args.single}/38 single blocks): "
          f"{model_bytes / GB:.2f} GB per model = 1/{full_bytes / model_bytes:.1f} of {full_bytes / GB:.1f} GB; "
          f"disk needed {need / GB:.1f} GB, free {free / GB:.1f} GB", flush=True)
    if need > free - 8 * GB:
        print("not enough free disk (keeping 8 GB for others): use fewer blocks", file=sys.stderr)
        return 2
    a, b = write_models(args.workdir, specs)
    from lib_merge.io.hashes import HashCache

    hashes = HashCache(args.workdir / "hashes.json")  # our metadata's input hashes, cached as the WebUI caches them
    for p in (a, b):
        hashes.sha256(p), hashes.legacy_hash(p)
    out = {"ours": args.workdir / "merged_ours.safetensors", "mecha": args.workdir / "merged_mecha.safetensors"}
    results: dict[str, list[dict]] = {"ours": [], "mecha": []}
    try:
        for run in range(args.runs):
            order = ("ours", "mecha") if run % 2 == 0 else ("mecha", "ours")
            for who in order:
                for p in out.values():  # one output on disk at a time
                    p.unlink(missing_ok=True)
                _sync()
                _warm([a, b])
                busy = _cpu_busy()
                spec = {"who": who, "a": str(a), "b": str(b), "out": str(out[who]),
                        "hash_cache": str(args.workdir / "hashes.json")}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
                code, stdout, wall, usage = run_subprocess(cmd, dict(os.environ), args.workdir / "flux.log", 3600)
                line = next((x for x in stdout.splitlines() if x.startswith(MARK)), None)
                if code != 0 or line is None:
                    print(f"{who} failed (exit {code}); see {args.workdir / 'flux.log'}", file=sys.stderr)
                    return 1
                r = json.loads(line[len(MARK):])
                r["maxrss"] = usage.ru_maxrss * 1024
                r["busy_before"] = busy
                results[who].append(r)
                print(f"run {run + 1} {who:5}: {r['time']:.1f} s, peak RSS {r['maxrss'] / GB:.2f} GB "
                      f"(others' CPU use before: {busy:.0%})", flush=True)
            if run == args.runs - 1:  # both outputs of the last run are compared (the last contender's is on disk)
                other = order[0]  # its output was deleted before the last contender ran
                spec = {"who": other, "a": str(a), "b": str(b), "out": str(out[other]),
                        "hash_cache": str(args.workdir / "hashes.json")}
                run_subprocess([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                               dict(os.environ), args.workdir / "flux.log", 3600)
                n, same, first = compare(out["ours"], out["mecha"])
                print(f"outputs: {same} of {n} keys bit-identical{'' if same == n else f' (first differing: {first})'}")
        for who, rs in results.items():
            print(f"{who:5}: median {statistics.median(r['time'] for r in rs):.1f} s, "
                  f"peak RSS max {max(r['maxrss'] for r in rs) / GB:.2f} GB over {len(rs)} runs")
    finally:
        if not args.keep:
            for p in (*out.values(), a, b):
                p.unlink(missing_ok=True)
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
