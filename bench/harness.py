"""The benchmark harness: `Bench` holds the run's settings and models, the helpers every task uses (contenders,
ratios, targets, result checks), runs the tasks and writes the report and results.json; `load_raw` reads those back
for --render-only."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path

from checks import compare, extract_keys, load_checks, pick_check_keys, shapes_of
from machine import git_state, has_mecha, machine_info
from measure import Contender, Runner
from report import render
from results import Measure, TaskResult, median_cpu, median_time, settings
from tasks import RUNS, TASKS, TITLES


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkdir = self.workdir / "checks"
        self.checkdir.mkdir(exist_ok=True)
        self.runner = Runner(self.workdir, args.inline, args.timeout, verbose=not args.silent,
                             quiet_wait=0 if args.inline else args.quiet_wait)
        self.cache = Path(args.cache).resolve()
        self.xdg = self.workdir / "xdg"
        self.hash_cache = self.xdg / "block-merger" / "hashes.json"
        self.mecha = (not args.no_mecha) and has_mecha()
        self.results: list[TaskResult] = []
        self.paths: dict[str, dict[str, str]] = {}

    # ---------------------------------------------------------------- helpers
    def models(self, family: str) -> dict[str, str]:
        if family not in self.paths:
            from make_models import make_models

            made = make_models(family, self.args.factor, self.cache, verbose=not self.args.silent)
            self.paths[family] = {k: str(v) for k, v in made.items()}
        return self.paths[family]

    def warm_hashes(self, paths) -> None:
        from lib_merge.io.hashes import HashCache

        cache = HashCache(self.hash_cache)
        for p in paths:
            cache.sha256(p)
            cache.legacy_hash(p)

    def out(self, task, label) -> str:
        return str(self.workdir / f"out_{task}_{label.replace(' ', '_').replace('/', '_')}.safetensors")

    def check_path(self, task, label) -> str:
        return str(self.checkdir / f"{task}__{label.replace(' ', '_').replace('/', '_')}.safetensors")

    def run_task(self, res: TaskResult, contenders: list[Contender]) -> None:
        for c in contenders:
            res.rows[c.label] = {"kind": c.kind, "measures": [], "spec": c.spec}
        most = max(c.runs for c in contenders)
        for run in range(most):
            active = [c for c in contenders if run < c.runs]
            shift = run % len(active)
            for c in active[shift:] + active[:shift]:
                m = self.runner.measure(res.name, c, run)
                res.rows[c.label]["measures"].append(m)
                out = c.spec.get("out")
                if out and os.path.exists(out):
                    if run == 0 and m.error is None:
                        extract_keys(out, c.spec["check_keys"], self.check_path(res.name, c.label))
                    os.remove(out)

    def ratio(self, res: TaskResult, ours: str, base: str, note: str = "") -> float | None:
        empty = {"measures": []}
        to, tb = median_time(res.rows.get(ours, empty)), median_time(res.rows.get(base, empty))
        r = tb / to if to and tb else None
        co, cb = median_cpu(res.rows.get(ours, empty)), median_cpu(res.rows.get(base, empty))
        if co and cb:
            note = (note + "; " if note else "") + f"CPU-time ratio {cb / co:.2f}x"
        res.ratios.append((ours, base, r, note))
        return r

    def target(self, res: TaskResult, name: str, value: float | None, goal: float, higher: bool, unit: str = "x"):
        if value is None:
            res.targets.append({"name": name, "value": None, "goal": goal, "met": None, "text": "not measured"})
            return
        met = value >= goal if higher else value <= goal
        if unit == "x":
            by = value / goal
            text = (f"{value:.2f}x vs ≥ {goal:g}x: " + ("met" if met else f"missed (reached {by:.0%} of the target)"))
        elif unit == "%":
            text = f"{value:.1f} % vs ≤ {goal:g} %: " + ("met" if met else f"missed by {value - goal:.1f} points")
        else:
            text = f"{value:.2f} {unit} vs ≤ {goal:g} {unit}: " + ("met" if met else f"missed by {value - goal:.2f}")
        res.targets.append({"name": name, "value": value, "goal": goal, "met": met, "text": text})

    def check(self, res: TaskResult, label: str, ref_label: str, what: str | None = None, ref: dict | None = None):
        test = load_checks(self.check_path(res.name, label))
        ref = ref if ref is not None else load_checks(self.check_path(res.name, ref_label))
        if not test or not ref:
            res.checks.append((what or f"{label} vs {ref_label}", "no check data (a run failed or was skipped)"))
            return None
        cmp = compare(test, ref)
        res.checks.append((what or f"{label} vs {ref_label}", cmp))
        return cmp

    def base_spec(self, family="sd1", **kw) -> dict:
        p = self.models(family)
        shapes = shapes_of(p["A"])
        spec = {"a": p["A"], "b": p["B"], "check_keys": pick_check_keys(shapes)}
        spec.update(kw)
        return spec

    def contender(self, task, label, kind, op, spec, runs=None, inputs=None, warm=True, check=True, out=False,
                  fast=False):
        s = dict(spec, op=op)
        if check:
            s["check_path"] = self.check_path(task, label)
        if out:
            s["out"] = self.out(task, label)
            s.pop("check_path", None)
        if op in ("ours_file", "ours_cli"):
            s["hash_cache"] = str(self.hash_cache)
            s["xdg"] = str(self.xdg)
        ins = inputs or [s[k] for k in ("a", "b", "c") if s.get(k)]
        runs = runs or (max(self.args.runs, self.args.fast_runs) if fast else self.args.runs)
        return Contender(label, kind, s, runs, ins, warm)

    def cuda_contender(self, res, contenders, spec):
        """Where a CUDA device exists and the engine takes `device`, also run ours on it (the issue asks for it)."""
        if not self.machine.get("cuda"):
            return
        import inspect

        from lib_merge.core.engine import run_merge

        if "device" not in inspect.signature(run_merge).parameters:
            res.notes.append("A CUDA device is present but run_merge has no `device` parameter: not run on it.")
            return
        contenders.append(self.contender(res.name, "ours → new dict, CUDA", "ours", "ours_dict",
                                         dict(spec, device="cuda")))
        res.notes.append(f"'ours → new dict, CUDA' computes every key on {self.machine.get('cuda_device')} "
                         f"(inputs read on the CPU, results copied back into the dict).")

    def mecha_or_note(self, res, contenders, c):
        if self.mecha:
            contenders.append(c)
        else:
            res.notes.append("sd-mecha is not installed (or --no-mecha): its column is empty.")

    # ---------------------------------------------------------------- notes shared by the save tasks
    def save_notes(self, res):
        fs = []
        for lab, row in res.rows.items():
            f = [m.data.get("fsync_after") for m in row["measures"] if m.data.get("fsync_after") is not None]
            if f:
                fs.append(f"{lab}: {statistics.median(f):.2f} s")
        res.notes.append("Ours writes atomically and fsyncs the file before the rename, inside its time; the seed's "
                         "save_file and sd-mecha do not fsync. An fsync right after their run (not in their time) "
                         "took " + ("; ".join(fs) if fs else "n/a") + ". Metadata: ours hashes the inputs (sha256 "
                         "and legacy hash) from a warm hash cache, as on any merge after the first.")

    # ---------------------------------------------------------------- driver
    def run(self, tasks):
        self.started = time.time()
        self.machine = machine_info()
        for name in tasks:
            res = TaskResult(name, TITLES[name])
            self.runner.say(f"== {name}: {res.title}")
            load0 = os.getloadavg()
            res.extra["git"] = git_state()  # code measured: other sessions may commit while the harness runs
            t0 = time.perf_counter()
            try:
                RUNS[name](self, res)
            except Exception as e:
                res.skipped = f"task failed: {type(e).__name__}: {e}"
                traceback.print_exc()
            res.extra["seconds"] = time.perf_counter() - t0
            res.extra["settings"] = settings(self.args, self.machine)
            res.extra["load"] = (load0, os.getloadavg())
            self.results.append(res)
            self.write_report()
        self.write_report()
        return self.results

    def write_report(self, raw: bool = True):
        text = render(self)
        out = Path(self.args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        if raw:
            (self.workdir / "results.json").write_text(json.dumps(_raw(self), indent=1, default=str),
                                                       encoding="utf-8")

def _raw(bench: Bench) -> dict:
    out = {"machine": getattr(bench, "machine", {}), "args": vars(bench.args), "tasks": []}
    for r in bench.results:
        rows = {}
        for lab, row in r.rows.items():
            rows[lab] = {"kind": row["kind"], "derived": row.get("derived", False),
                         "label_time": row.get("label_time"),
                         "measures": [{"time": m.time, "rss": m.rss, "error": m.error,
                                       "data": {k: v for k, v in m.data.items() if k != "per_key"}}
                                      for m in row["measures"]]}
        out["tasks"].append({"name": r.name, "rows": rows, "ratios": r.ratios, "checks": r.checks,
                             "targets": r.targets, "notes": r.notes, "extra": r.extra, "skipped": r.skipped})
    return out


def load_raw(bench: Bench, paths: list[Path]) -> None:
    """Fill `bench` from results.json files written by earlier runs (for --render-only); tasks are put in the
    harness's order, a task found in several files is taken from the last one."""
    by_name, bench.parts = {}, []
    for n, path in enumerate(paths):
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        args = argparse.Namespace(**raw["args"])
        if n == 0:
            bench.machine = raw["machine"]
            for key in ("runs", "sdxl_runs", "smooth_full_runs", "factor", "cache", "inline", "fast_runs"):
                if key in raw["args"]:
                    setattr(bench.args, key, raw["args"][key])
            bench.mecha = not raw["args"].get("no_mecha") and bool(raw["machine"].get("sd_mecha"))
        bench.parts.append(settings(args, raw["machine"]))
        for t in raw["tasks"]:
            t["extra"].setdefault("settings", settings(args, raw["machine"]))
            by_name[t["name"]] = t
    bench.results = []
    for name in TASKS:
        t = by_name.get(name)
        if t is None:
            continue
        r = TaskResult(t["name"], TITLES[t["name"]], ratios=[tuple(x) for x in t["ratios"]],
                       checks=[tuple(x) for x in t["checks"]], notes=t["notes"], targets=t["targets"],
                       extra=t["extra"], skipped=t["skipped"])
        for lab, row in t["rows"].items():
            r.rows[lab] = {"kind": row["kind"], "derived": row.get("derived"), "label_time": row.get("label_time"),
                           "measures": [Measure(m["time"], m["rss"], m["data"], m["error"]) for m in row["measures"]]}
        bench.results.append(r)
