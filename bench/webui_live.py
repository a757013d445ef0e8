"""The WebUI path, measured against the fake WebUI host (tests/fakes/modules): merge -> ready to generate, with the
model's memory, as a user of the tab sees it (issue 12's table, without the WebUI itself).

    python bench/webui_live.py                     # SD1.5, full size; writes bench/WEBUI_LIVE.md
    python bench/webui_live.py --family sdxl --prewarm --output bench/WEBUI_LIVE_SDXL.md
                                                   # SDXL (needs ~16 GB free: the fake loads a 6.9 GB model; with
                                                   # 24 GB of RAM the model, A and B just fit in the page cache)
    python bench/webui_live.py --factor 16 --merges 4 --output /tmp/w.md   # a quick, small run
    python bench/webui_live.py --no-half --output /tmp/w.md   # the model in fp32, as the WebUI runs on a CPU

Everything runs in one fresh child process (no other heap in it): the fake WebUI loads model A as the WebUI does
(fp16), then `MergeService.merge_and_load` runs through `A1111Host` exactly as the tab's Merge button: a full
Weight sum with 26 block weights (the first, then later ones), one block changed, Add difference with C, more merges
up to `--merges`, and "Restore base model". Times are wall times around each call. Memory is read from
/proc/self/status: the peak (VmHWM, reset before each action through /proc/self/clear_refs) over the resident size
before the action, and the anonymous resident size (RssAnon: the heap, without the source files' page cache) after
the merges and the restore. The engine's own floor (`run_merge` into the same tensors with `TensorSink`, no host)
is measured in the same process for the ratio.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FAKES = ROOT / "tests" / "fakes"
MARK = "@@WEBUI_LIVE@@ "
GB = 1e9
W26 = [0.5] + [round(0.15 + 0.03 * i, 2) for i in range(25)]  # as bench/run.py
CHANGED_BLOCK = 20  # OUT07, 40 tensors in SD1.5 (the "one block changed")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _weights(change: float = 0.0) -> str:
    """The 26 block weights, each moved by `change`."""
    return ",".join(f"{round(min(0.95, v + change), 4):g}" for v in W26)


def _fake_webui(folder: Path, names: dict[str, Path], no_half: bool = False):
    """The fake `modules` package, with the benchmark models linked into its models folder and A loaded."""
    for path in (FAKES, FAKES.parent, ROOT):  # the fake `modules`, `fakes.stubs`, lib_merge
        sys.path.insert(0, str(path))
    from fakes import stubs

    sys.modules.setdefault("gradio", stubs.make_gradio())
    sys.modules.setdefault("fastapi", stubs.make_fastapi())
    from modules import paths, sd_models, shared

    paths.data_path = str(folder)  # the WebUI's data folder (the extension's hash cache), not the working directory

    for which, path in names.items():
        (folder / f"{which}.safetensors").symlink_to(path)
    sd_models.model_path = str(folder)
    shared.opts.data["block_merger_history_file"] = str(folder / "mergehistory.csv")
    sd_models.list_models()
    shared.opts.sd_model_checkpoint = "A.safetensors"
    shared.cmd_opts.no_half = no_half
    return shared


def child(spec: dict) -> dict:
    folder = Path(spec["folder"])
    shared = _fake_webui(folder, {k: Path(v) for k, v in spec["models"].items()}, spec["no_half"])
    t0 = time.perf_counter()
    model = shared.sd_model  # loads A as at the WebUI's start
    load_s = time.perf_counter() - t0
    from lib_merge.core.engine import TensorSink, plan_merge, run_merge
    from lib_merge.core.recipe import Recipe
    from lib_merge.hosts.a1111 import A1111Host
    from lib_merge.service.merge_service import MergeService

    service = MergeService(A1111Host(ROOT), log_merges=False)
    gc.collect()
    start = _status()
    model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = []

    def act(label: str, call) -> None:
        gc.collect()
        before = _status()
        _reset_peak()
        t = time.perf_counter()
        outcome = call()
        dt = time.perf_counter() - t
        after = _status()
        rows.append({"action": label, "seconds": dt, "rss_before": before["VmRSS"], "peak": after["VmHWM"],
                     "extra_peak": after["VmHWM"] - before["VmRSS"], "anon_after": after["RssAnon"],
                     "recomputed": getattr(outcome, "recomputed", None),
                     "note": getattr(outcome, "note", "")})

    def ws(weights: str):
        return Recipe("A.safetensors", "B.safetensors", weights_alpha=weights)

    with service.host.writable_weights() as live:  # the engine's floor writes the same tensors, without the host
        tensors = live.tensors
    floors = []

    def floor(weights: str) -> None:
        """The engine alone: the same merge into the same tensors (run just before the WebUI path merges it all
        again, so both see the same machine load and the model stays what the service believes)."""
        models = service.models(ws(weights).validate(service.presets))
        plan = plan_merge(ws(weights), models, service.presets)
        t = time.perf_counter()
        run_merge(plan, models, TensorSink(tensors))
        floors.append(time.perf_counter() - t)

    first, later, again = _weights(), _weights(0.02), _weights(0.04)
    floor(first)
    service.restore_base()
    act("Merge -> ready, first full Weight sum (26 block weights)", lambda: service.merge_and_load(ws(first)))
    floor(later)
    act("the same, a later merge (every block changed)", lambda: service.merge_and_load(ws(later)))
    floor(again)
    act("the same, a later merge (every block changed)", lambda: service.merge_and_load(ws(again)))
    one = again.split(",")
    one[CHANGED_BLOCK] = f"{float(one[CHANGED_BLOCK]) + 0.05:g}"
    act("one block changed (OUT07)", lambda: service.merge_and_load(ws(",".join(one))))
    act("Add difference with C", lambda: service.merge_and_load(
        Recipe("A.safetensors", "B.safetensors", "C.safetensors", mode="Add difference", alpha=0.5)))
    count = 5
    while count < spec["merges"]:
        step = count % 3
        recipe = (ws(_weights(0.01 * count)) if step == 0 else
                  ws(",".join(one)) if step == 1 else
                  Recipe("A.safetensors", "B.safetensors", "C.safetensors", mode="Add difference", alpha=0.1 * step))
        act(f"merge {count + 1}", lambda r=recipe: service.merge_and_load(r))
        count += 1
    act("Restore base model", service.restore_base)
    gc.collect()
    settled = _status()
    act("first full Weight sum after the restore", lambda: service.merge_and_load(ws(first)))
    service.close()
    return {"rows": rows, "load_s": load_s, "start": start, "settled": settled, "model_bytes": model_bytes,
            "engine_floor_s": floors, "merges": count}


def render(result: dict, spec: dict, machine: str) -> str:
    start, settled = result["start"], result["settled"]
    lines = [
        f"# The WebUI path against the fake WebUI host ({spec['family']}, factor {spec['factor']})",
        "",
        f"Generated by `python bench/webui_live.py {' '.join(spec['argv'])}` on {machine}.",
        f"Model in RAM: {result['model_bytes'] / GB:.2f} GB "
        f"({'fp32, --no-half, as the WebUI runs on a CPU' if spec['no_half'] else 'fp16, as the WebUI loads it'}); "
        f"fake WebUI start "
        f"(load of A) {result['load_s']:.1f} s; resident at start {start['VmRSS'] / GB:.2f} GB "
        f"(anonymous {start['RssAnon'] / GB:.2f} GB).",
        "",
        "| Action | Time | Tensors computed | Peak RSS over the RSS before | Anonymous RSS after |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        computed = "" if row["recomputed"] is None else str(row["recomputed"])
        lines.append(f"| {row['action']} | {row['seconds']:.2f} s | {computed} | "
                     f"+{row['extra_peak'] / GB:.2f} GB | {row['anon_after'] / GB:.2f} GB |")
    floors = result["engine_floor_s"]
    ratios = [row["seconds"] / f for row, f in zip(result["rows"][:3], floors, strict=True)]
    lines += [
        "",
        f"- Engine floor (each of the three full Weight sums run just before by `run_merge` alone into the same "
        f"tensors, no host): {', '.join(f'{f:.2f}' for f in floors)} s; the WebUI path took "
        f"{', '.join(f'{r:.2f}x' for r in ratios)} that (median {statistics.median(ratios):.2f}x).",
        f"- Resident after {result['merges']} merges and a restore: {settled['VmRSS'] / GB:.2f} GB, anonymous "
        f"{settled['RssAnon'] / GB:.2f} GB: {(settled['RssAnon'] - start['RssAnon']) / GB:+.2f} GB over the start "
        f"(the source files' page cache is not in the process: they are read with pread, not mapped).",
    ]
    lines.append("- The first merge after a load or a restore takes model A's values from the model's own tensors "
                 "(`service/as_loaded.py`: they are proven unchanged since), so it reads only B; the engine floor "
                 "reads both files.")
    lines.append("- The empty-prompt conditioning (CLIP on '', 0.2 s on this CPU in the WebUI; the fake hashes every "
                 "text-encoder weight, 0.28 s) is computed after a merge only with \"Pad prompt/negative prompt\" on, "
                 "the one setting under which the WebUI reads it; here it is off, the WebUI's default, so it is left "
                 "to the first generation that pads (`A1111Host.refresh_empty_prompt`).")
    if spec["prewarm"]:
        lines.append("- B and A were read once before the run (`--prewarm`), so the merges read them from the page "
                     "cache; C was not (Add difference reads it from the disk).")
    notes = sorted({row["note"] for row in result["rows"] if row["note"]})
    lines += [f"- Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    load = os.getloadavg()[0]
    cores = os.cpu_count()
    return f"{cores} cores, load average {load:.1f} when the run started (a shared machine)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    ap.add_argument("--factor", type=int, default=1, help="model size divisor (1 = full size)")
    ap.add_argument("--merges", type=int, default=20, help="merges before the restore (at least 5)")
    ap.add_argument("--prewarm", action="store_true",
                    help="read B and A once before the run, so that merges read them from the page cache")
    ap.add_argument("--no-half", action="store_true", help="the model in fp32 (the WebUI's --no-half, as on a CPU)")
    ap.add_argument("--cache", default=str(BENCH / "cache"), help="where the synthetic models are (made if missing)")
    ap.add_argument("--output", default=str(BENCH / "WEBUI_LIVE.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    sys.path.insert(0, str(BENCH))
    from make_models import make_models

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:  # the cache may be shared: one writer at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        models = {k: str(v) for k, v in make_models(args.family, args.factor, cache, verbose=False).items()}
    if args.prewarm:
        for which in ("B", "A"):
            with open(models[which], "rb") as f:
                while f.read(1 << 24):
                    pass
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="webui-live-") as tmp:
        spec = {"folder": tmp, "models": models, "merges": max(5, args.merges), "family": args.family,
                "no_half": args.no_half, "prewarm": args.prewarm,
                "factor": args.factor, "argv": list(argv if argv is not None else sys.argv[1:])}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        print(f"the measuring process failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    result = json.loads(lines[-1][len(MARK):])
    report = render(result, spec, machine)
    Path(args.output).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
