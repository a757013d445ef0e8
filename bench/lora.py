"""LoRA benchmarks (issue 14): bake 3 LoRAs into a full-size checkpoint, and extract a rank-128 LoRA.

    python bench/lora.py bake [--family sd1] [--rank 32] [--count 3] [--threads 0,1] [--repeat N] [--out-dir DIR]
                               [--json OUT.json]
    python bench/lora.py extract [--rank 128] [--threads N] [--limit 2400] [--markdown TABLE.md] [--json OUT.json]

Each contender runs in its own subprocess (so its peak RSS is its own) on the same files in one run; the ratios
are what to read on a shared machine. `--threads`: torch thread counts to run every contender with (0: torch's
default, one per core); `--repeat N`: N runs of every contender, alternating, and ratios of the medians. Contenders:
- bake: ours (`bake_to_file`, streamed, fp32 per key, rounded once) against a re-implementation of the seed's
  merge-to-checkpoint data flow (§2.3 of seed-lora-analysis.md, device cpu; `seed_bake` lists its steps): the
  whole checkpoint loaded, each LoRA's factors put in fp16 modules, per module W.to(fp32) made, up@down computed in
  fp32, scaled twice and added in place in the checkpoint's dtype, LoRA after LoRA, then everything saved with
  safetensors; and sd-mecha (each kohya LoRA converted to a delta of the base model's format, added
  with add_difference, streamed to the output). Two times each: `seconds`, until the call returns (the seed's
  save_file and sd-mecha return with the data still in the page cache; ours fsyncs before its atomic rename, so
  `unsynced_seconds` is ours without that wait), and `synced_seconds`, until the output is on disk (the others'
  output fsynced after their call returns; ours as it returns).
- extract: ours with the default exact truncated SVD (`full`: Gram matrix eigenvectors for large layers, a plain SVD
  for small ones) and with torch.svd_lowrank, against kohya's extraction as the seed calls it (per layer fp32
  difference, `torch.linalg.svd` with full matrices, 0.99 quantile clamp), each in one process with a time limit
  (`--limit`, seconds; a contender past it is recorded as such), wall and CPU seconds, peak RSS and the relative
  error ‖ΔW − up·down‖/‖ΔW‖ of its saved file; `--markdown` writes the table.
  Memory of the kohya path is a lower bound: kohya converts both models to fp32 modules first, which this does
  not do (8.6 GB would not fit beside the other sessions of this machine).
The LoRAs are synthetic: every attention Linear/1x1 and text-encoder module of the model, random factors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.make_models import CACHE, make_models, model_path  # noqa: E402
from lib_merge.io.checkpoint import open_checkpoint  # noqa: E402
from lib_merge.lora.extract import extract_kind  # noqa: E402
from lib_merge.lora.keys import checkpoint_targets, kohya_name, module_id  # noqa: E402


def make_loras(model: Path, family: str, rank: int, count: int) -> list[Path]:
    paths = [CACHE / f"lora_{family}_r{rank}_{i}.safetensors" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    from safetensors.torch import save_file

    with open_checkpoint(model) as ckpt:
        targets = checkpoint_targets(ckpt.keys(), ckpt.shape, family)
        shapes = {mid: (t, ckpt.shape(t.key)) for mid, t in targets.items()
                  if extract_kind(mid) in ("attn", "te") and len(ckpt.shape(t.key)) >= 2}
    for i, path in enumerate(paths):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for mid, (t, shape) in shapes.items():
            out = (t.rows[1] - t.rows[0]) if t.rows else shape[0]
            name = kohya_name(mid, family)
            extra = (1, 1) if len(shape) == 4 else ()
            tensors[f"{name}.lora_down.weight"] = (torch.randn((rank, shape[1], *extra), generator=g) * 0.02).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn((out, rank, *extra), generator=g) * 0.02).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank // 2)).half()
        save_file(tensors, str(path))
    return paths


def seed_bake(model: Path, loras: list[Path], out: Path, family: str) -> None:
    """The seed's merge-to-checkpoint on the CPU, step by step as its code does them (§2.3 of
    seed-lora-analysis.md; `pluslora` -> `newpluslora` -> `plusweights`, and the WebUI Lora loader it carries):
    the whole checkpoint read; each LoRA read whole, its factors copied into fp16 `nn` modules (`create_module`);
    then per LoRA and module: `W.to(fp32)` passed as the original weight (`plusweights`), the factors upcast to
    fp32 (`cpufloat`), `up @ down`, `* scale`, `* multiplier` (`finalize_updown`: two products, each a new
    tensor), cast to W's dtype and added in place; everything saved with safetensors. Unlike the seed, the rows
    of OpenCLIP's fused `in_proj` get their q/k/v deltas (the seed drops them), so both paths do the same work."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(model))  # the whole checkpoint, as read_state_dict does
    targets = checkpoint_targets(state.keys(), lambda k: tuple(state[k].shape), family)
    with torch.no_grad():
        for path in loras:
            tensors = load_file(str(path))  # as the loader's read_state_dict
            modules = {}
            for key in tensors:
                if key.endswith(".lora_down.weight"):
                    name = key[: -len(".lora_down.weight")]
                    modules[name] = [_seed_factor_module(tensors[f"{name}.{part}.weight"])
                                     for part in ("lora_up", "lora_down")]
            for name, (up_model, down_model) in modules.items():
                target = targets[module_id(name, family)]
                w = state[target.key]
                rows = slice(*target.rows) if target.rows else slice(None)
                orig_weight = w[rows].to(dtype=torch.float32)  # plusweights: calc_updown(weight.to(fp32))
                up, down = up_model.weight.float(), down_model.weight.float()  # cpufloat
                updown = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
                updown = updown.reshape(orig_weight.shape)
                updown = updown * (float(tensors[f"{name}.alpha"]) / down.shape[0])  # calc_scale
                updown = updown * 1.0  # multiplier(): the spec's strength 1 (lbw scaled the up factor by it)
                w[rows] += updown.to(w.dtype)  # in place, in W's dtype
    save_file(state, str(out))


def _seed_factor_module(weight: torch.Tensor) -> torch.nn.Module:
    """The WebUI Lora loader's `create_module`: a new `nn.Linear` (or 1x1 `nn.Conv2d`) the factor's size, the
    factor copied into it, the module cast to fp16 (`devices.dtype`)."""
    if weight.dim() == 4:
        module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
    else:
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.copy_(weight.reshape(module.weight.shape))
    return module.to(dtype=torch.float16).requires_grad_(False)


def ours_bake(model: Path, loras: list[Path], out: Path, family: str) -> float:
    """Ours; returns the seconds its own fsync of the output took (the wait for the disk)."""
    from lib_merge.lora.bake import bake_to_file
    from lib_merge.lora.blocks import parse_spec

    waited = [0.0]
    fsync = os.fsync

    def timed_fsync(fd: int) -> None:
        start = time.perf_counter()
        fsync(fd)
        waited[0] += time.perf_counter() - start

    os.fsync = timed_fsync
    try:
        bake_to_file(model, [parse_spec(f"{p}:1") for p in loras], out, metadata=False, overwrite=True)
    finally:
        os.fsync = fsync
    return waited[0]


#: sd-mecha's model config of a checkpoint of each family (the LoRA's config is found from its keys)
MECHA_CONFIGS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}


def mecha_bake(model: Path, loras: list[Path], out: Path, family: str) -> None:
    """sd-mecha: each LoRA converted to a delta of the checkpoint's format, added to the base (fp32 inside, one
    rounding to fp16 at the output), keys no LoRA has taken from the base; streamed to `out`."""
    import mecha_ref
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear

    recipe = sd_mecha.model(model)
    for path in loras:
        delta = sd_mecha.convert(sd_mecha.model(path), MECHA_CONFIGS[family])
        recipe = linear.add_difference(recipe, delta, alpha=1.0) | recipe
    mecha_ref.run(recipe, out)


def kohya_extract(a: Path, b: Path, out: Path, family: str, rank: int) -> None:
    from safetensors.torch import save_file

    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        targets = {mid: t for mid, t in checkpoint_targets(ca.keys(), ca.shape, family).items()
                   if extract_kind(mid) in ("attn", "te") and len(ca.shape(t.key)) >= 2}
        tensors = {}
        for mid, t in targets.items():
            rows = slice(*t.rows) if t.rows else slice(None)
            mat = (ca.get(t.key).float()[rows] - cb.get(t.key).float()[rows])
            mat = mat.reshape(mat.shape[0], -1)
            r = min(rank, *mat.shape)
            u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, as kohya calls it
            u, vh = u[:, :r] @ torch.diag(s[:r]), vh[:r, :]
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), 0.99)
            name = kohya_name(mid, family)
            tensors[f"{name}.lora_up.weight"] = u.clamp(-hi, hi).contiguous().half()
            tensors[f"{name}.lora_down.weight"] = vh.clamp(-hi, hi).contiguous().half()
            tensors[f"{name}.alpha"] = torch.tensor(float(r)).half()
    save_file(tensors, str(out))


def ours_extract(a: Path, b: Path, out: Path, family: str, rank: int, method: str) -> None:
    from lib_merge.lora.extract import extract_to_file
    from lib_merge.lora.lowrank import RankChoice

    extract_to_file(a, b, out, rank=RankChoice(rank), method=method, overwrite=True, te_threshold=-1)


def extraction_error(a: Path, b: Path, lora: Path, family: str) -> float:
    """‖ΔW − up@down‖ / ‖ΔW‖ over all extracted layers (relative Frobenius error)."""
    from safetensors.torch import load_file

    tensors = load_file(str(lora))
    num = den = 0.0
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        for mid, t in checkpoint_targets(ca.keys(), ca.shape, family).items():
            name = kohya_name(mid, family)
            if f"{name}.lora_up.weight" not in tensors:
                continue
            rows = slice(*t.rows) if t.rows else slice(None)
            diff = (ca.get(t.key).float()[rows] - cb.get(t.key).float()[rows]).reshape(
                (t.rows[1] - t.rows[0]) if t.rows else ca.shape(t.key)[0], -1).double()
            up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
            approx = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            num += float(((diff - approx) ** 2).sum())
            den += float((diff ** 2).sum())
    return (num / den) ** 0.5


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_one(args) -> None:
    if args.contender == "mecha-bake":
        sys.path.insert(0, str(ROOT / "bench"))
        import mecha_ref  # noqa: F401  (sd_mecha's import and registrations before the clock starts, as torch's)
    start = time.perf_counter()
    out = Path(args.out)
    times = {}
    if args.contender in ("seed-bake", "mecha-bake"):
        bake = seed_bake if args.contender == "seed-bake" else mecha_bake
        bake(Path(args.model), [Path(p) for p in args.loras], out, args.family)
        seconds = time.perf_counter() - start  # until the call returned
        sync_file(out)
        times = {"synced_seconds": time.perf_counter() - start}
    elif args.contender == "ours-bake":
        waited = ours_bake(Path(args.model), [Path(p) for p in args.loras], out, args.family)
        seconds = time.perf_counter() - start
        times = {"synced_seconds": seconds, "unsynced_seconds": seconds - waited}
    else:
        if args.contender == "kohya-extract":
            kohya_extract(Path(args.model), Path(args.loras[0]), out, args.family, args.rank)
        else:
            ours_extract(Path(args.model), Path(args.loras[0]), out, args.family, args.rank,
                         args.contender.removeprefix("ours-extract-"))
        seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 1024 / 1024  # KiB -> GiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # on a loaded machine, CPU time says more than wall time
    print(json.dumps({"contender": args.contender, "seconds": seconds, "cpu_seconds": cpu, "peak_gib": peak,
                      "threads": torch.get_num_threads(), **times}))


def floor(model: Path, loras: list[Path], family: str, threads: int, out_dir: Path) -> dict:
    """The physical floor of a bake on this machine: reading the model (from the page cache, as every contender
    starts), writing a file of its size where the outputs go (`out_dir`, fsynced), and the apply's GFLOP
    (2·out·in·Σrank per touched key) at the GFLOPS of an fp32 addmm of the same shapes (measured on the first keys,
    `threads` torch threads, after one untimed pass that touches the memory)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        return _floor(model, loras, out_dir)
    finally:
        torch.set_num_threads(default)  # the contenders' failure records read it


def _floor(model: Path, loras: list[Path], out_dir: Path) -> dict:
    from lib_merge.lora.bake import plan_bake
    from lib_merge.lora.blocks import parse_spec

    warm([model])
    size = model.stat().st_size
    start = time.perf_counter()
    with open(model, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    read_s = time.perf_counter() - start
    scratch = out_dir / "floor.bin"
    block = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    scratch.unlink()
    with open_checkpoint(model) as ckpt:
        plan = plan_bake(ckpt, [parse_spec(f"{p}:1") for p in loras])
        work = [(ckpt.shape(k)[0], math.prod(ckpt.shape(k)[1:]), sum(c.module.rank for c in cs))
                for k, cs in plan.changes.items()]
    gflop = sum(2 * o * i * r for o, i, r in work) / 1e9
    sample = work[:40]
    tensors = [(torch.zeros(o, i), torch.randn(o, r), torch.randn(r, i)) for o, i, r in sample]
    for w, u, d in tensors:
        w.addmm_(u, d)
    start = time.perf_counter()
    for w, u, d in tensors:
        w.addmm_(u, d)
    gflops = sum(2 * o * i * r for o, i, r in sample) / 1e9 / (time.perf_counter() - start)
    return {"model_gb": size / 1e9, "read_gb_s": size / 1e9 / read_s, "write_gb_s": size / 1e9 / write_s,
            "apply_gflop": gflop, "gflops": gflops, "threads": torch.get_num_threads(),
            "floor_seconds": read_s + write_s + gflop / gflops, "floor_unsynced_seconds": read_s + gflop / gflops}


def warm(paths) -> None:
    """Read the inputs once (every contender starts with them in the page cache) and flush earlier outputs to
    disk (no contender pays for the previous one's writes)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    os.sync()


def contender(name: str, model: Path, loras: list[Path], out: Path, family: str, rank: int, threads: int = 0,
              may_fail: bool = False, limit: float | None = None) -> dict:
    """One contender in its own process. `may_fail`: a failure is recorded (its last error line) instead of
    ending the run (sd-mecha, whose converters do not cover every family). Past `limit` seconds the contender is
    stopped and recorded as timed out."""
    warm([model, *loras])
    cmd = [sys.executable, __file__, "_run", name, "--model", str(model), "--out", str(out), "--family", family,
           "--rank", str(rank), "--threads", str(threads), "--loras", *map(str, loras)]
    load = os.getloadavg()[0]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"contender": name, "timed_out_after": limit, "load_before_after": [round(load, 1),
                                                                                   round(os.getloadavg()[0], 1)]}
    if res.returncode and may_fail:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        return {"contender": name, "threads": threads or torch.get_num_threads(),  # as the others record it
                "failed": lines[-1] if lines else f"exit {res.returncode}"}
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stderr}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["load_before_after"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return result


def bake_ratios(results: list[dict]) -> list[str]:
    """Seed ÷ contender per thread setting, from the median of each contender's repeats: as each call returns,
    until the output is on disk, and page cache to page cache (the seed as it returns ÷ ours without its fsync)."""
    def median(name: str, threads: int, field: str) -> float | None:
        values = [r[field] for r in results if r["contender"] == name and r["threads"] == threads and field in r]
        return statistics.median(values) if values else None

    lines = []
    for threads in dict.fromkeys(r["threads"] for r in results):
        seed = {f: median("seed-bake", threads, f) for f in ("seconds", "synced_seconds")}
        for name in ("ours-bake", "mecha-bake"):
            returns, synced = median(name, threads, "seconds"), median(name, threads, "synced_seconds")
            if returns is None:
                continue
            runs = sum(1 for r in results if r["contender"] == name and r["threads"] == threads and "seconds" in r)
            line = (f"{name} (threads {threads}, median of {runs}): "
                    f"{seed['seconds'] / returns:.2f}x the seed as it returns, "
                    f"{seed['synced_seconds'] / synced:.2f}x until on disk")
            unsynced = median(name, threads, "unsynced_seconds")
            if unsynced is not None:
                line += f", {seed['seconds'] / unsynced:.2f}x page cache to page cache"
            lines.append(line)
    return lines


def markdown_table(results: list[dict]) -> str:
    """The extraction results as a markdown table, ratios against the first (kohya's) contender."""
    base = results[0]
    lines = ["| Contender | wall s | CPU s | peak RSS GiB | relative error | wall ratio | CPU ratio | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = " / ".join(map(str, r["load_before_after"]))
        if "timed_out_after" in r:
            lines.append(f"| {r['contender']} | > {r['timed_out_after']:g} (stopped) | | | | | | {load} |")
            continue
        ratios = ["", ""]
        if "seconds" in base:
            ratios = [f"{base['seconds'] / r['seconds']:.2f}x", f"{base['cpu_seconds'] / r['cpu_seconds']:.2f}x"]
        lines.append(f"| {r['contender']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_gib']:.2f} | "
                     f"{r['relative_error']:.6f} | {ratios[0]} | {ratios[1]} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("bake", "extract", "_run"))
    parser.add_argument("contender", nargs="?")
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--loras", nargs="*")
    parser.add_argument("--threads", default="0", help="torch threads; for bake a comma list, each contender "
                        "runs with each (0: torch's default)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--out-dir", help="where the outputs are written (default bench/cache/lora-out); a tmpfs "
                        "such as /dev/shm takes the disk out of the times")
    parser.add_argument("--repeat", type=int, default=1, help="bake: runs of every contender, alternating; the "
                        "ratios are of the medians")
    parser.add_argument("--limit", type=float, default=None, help="seconds per contender (extract)")
    parser.add_argument("--markdown", help="write the extraction table to this file")
    args = parser.parse_args()
    if args.what == "_run":
        if int(args.threads):
            torch.set_num_threads(int(args.threads))
        run_one(args)
        return
    load_before = os.getloadavg()
    model_a = model_path(args.family, "A", 1, CACHE)
    # the bake reads model A only: an SDXL set is 3 x 7 GB, so B and C are made only for the extraction
    models = {"A": model_a} if args.what == "bake" and model_a.exists() else make_models(args.family, verbose=False)
    out_dir = Path(args.out_dir) if args.out_dir else CACHE / "lora-out"
    out_dir.mkdir(exist_ok=True)
    results, floors = [], []
    if args.what == "bake":
        rank = args.rank or 32
        loras = make_loras(models["A"], args.family, rank, args.count)
        for threads in (int(t) for t in args.threads.split(",")):
            floors.append(floor(models["A"], loras, args.family, threads, out_dir))
            print(json.dumps({"floor": floors[-1]}), flush=True)
        for threads in (int(t) for t in args.threads.split(",")):
            for rep in range(args.repeat):  # contenders alternate, so a slow spell of the machine hits them all
                for name in ("seed-bake", "ours-bake", "mecha-bake"):
                    out = out_dir / f"{name}.safetensors"
                    results.append({**contender(name, models["A"], loras, out, args.family, rank, threads,
                                                may_fail=name == "mecha-bake"), "repeat": rep})
                    print(json.dumps(results[-1]), flush=True)
                    out.unlink(missing_ok=True)  # an SDXL output is 7 GB: not two of them at once
    else:
        rank = args.rank or 128
        for name in ("kohya-extract", "ours-extract-full", "ours-extract-lowrank"):
            out = out_dir / f"{name}.safetensors"
            results.append(contender(name, models["B"], [models["A"]], out, args.family, rank, int(args.threads),
                                     limit=args.limit))
            if out.exists():
                if "seconds" in results[-1]:
                    results[-1]["relative_error"] = extraction_error(models["B"], models["A"], out, args.family)
                out.unlink()
            print(json.dumps(results[-1]), flush=True)
    for r in results:
        print(json.dumps(r))
    load = {"before_1_5_15min": [round(x, 2) for x in load_before],
            "after_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({"load": load}))
    if args.json:
        record = {"family": args.family, "load": load, "floor": floors, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.what == "bake":
        for line in bake_ratios(results):
            print(line)
        return
    table = markdown_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
