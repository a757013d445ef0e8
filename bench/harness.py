"""Side-by-side benchmarks of Block Merger against the seed's algorithm (bench/seed_ref.py) and sd-mecha.

    python bench/run.py                       # every task, 3 runs each, writes bench/RESULTS.md (about 30-40 min)
    python bench/run.py --quick               # 1 run each, smoothAdd on a key subset only, no SDXL
    python bench/run.py --tasks ws_mem,remerge --runs 5
    python bench/run.py --output /tmp/R.md --workdir /tmp/bench --cache /tmp/models --factor 16 --inline --no-mecha

How it measures (see the notes in RESULTS.md):

- Every measurement runs in its own fresh process (``python bench/run.py --child SPEC``), so no contender inherits
  another's heap or page-table state. Wall time is taken inside that process around the merge itself, after the
  imports (sd-mecha alone takes ~4 s to import); the CLI contender is timed as a whole process from outside.
  Peak resident memory is the child's ``ru_maxrss`` (from ``os.wait4``).
- Before every child the inputs are read once (page cache warm for every contender) and ``os.sync()`` flushes the
  previous contender's output, so nobody pays for someone else's writeback. The order of contenders rotates from
  run to run; the report gives the median over the runs and every single run.
- A few keys of every contender's result are saved after the timed part and compared with the seed's (max abs
  difference and the difference in fp16 ulps of the seed's value), so no speed is bought with wrong math.
- ``--inline`` runs the children in this process instead (for the smoke test: RSS is then not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MARK = "@@BENCH@@ "
GB = 1e9

# 26 block weights (BASE first), all strictly between 0 and 1 (the seed treats 0 and 1 as "keep A" / "take B").
W26 = [0.5] + [round(0.15 + 0.03 * i, 2) for i in range(25)]
W26_TEXT = ",".join(f"{w:g}" for w in W26)
ALPHA_ADD = 0.5
ALPHA_TRAIN = 0.5
ALPHA_COS = 0.3
ALPHA_SMOOTH = 0.5
REMERGE_BLOCKS = ("IN04", "OUT01", "M00", "BASE")  # small, typical and largest U-Net block; BASE is 19 % of SD1
REMERGE_DELTA = 0.05
SMOOTH_STEP = 20  # smoothAdd seed baseline: every 20th key of each tensor rank (stratified), scaled per rank

TASKS = ("ws_mem", "ws_save", "adddiff_mem", "adddiff_save", "traindiff", "cosineA", "smoothadd", "remerge", "sdxl")
ALIASES = {"adddiff": ("adddiff_mem", "adddiff_save"), "all": TASKS}
TITLES = {
    "ws_mem": "Weight sum, 26 block weights, in memory (SD1.5)",
    "ws_save": "Weight sum, 26 block weights, merge and save (SD1.5)",
    "adddiff_mem": "Add difference, in memory (SD1.5)",
    "adddiff_save": "Add difference, merge and save (SD1.5)",
    "traindiff": "trainDifference, in memory (SD1.5)",
    "cosineA": "cosineA, in memory (SD1.5)",
    "smoothadd": "smoothAdd, in memory (SD1.5)",
    "remerge": "One-block re-merge after a full merge, into A's loaded tensors (SD1.5)",
    "sdxl": "SDXL three-model Add difference, streamed to a file",
}


# ============================================================================================ child side (measured)
def _check_keys_save(state: dict, keys: list[str], path: str | None) -> None:
    """Save copies of `keys` of a result (after the timed part) for the correctness comparison."""
    if not path:
        return
    from safetensors.torch import save_file

    out = {k: state[k].detach().to("cpu").contiguous().clone() for k in keys if k in state}
    save_file(out, path)


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _recipe(spec):
    from lib_merge.core.recipe import Recipe

    return Recipe(
        model_a=spec["a"], model_b=spec.get("b", ""), model_c=spec.get("c", ""), mode=spec.get("mode", "Weight sum"),
        calc=spec.get("calc", "normal"), alpha=spec.get("alpha", 0.5), beta=spec.get("beta", 0.25),
        weights_alpha=spec.get("weights", "") or "",
    )


@contextlib.contextmanager
def _open_models(spec):
    from lib_merge.core.engine import Models
    from lib_merge.io.checkpoint import open_checkpoint

    with contextlib.ExitStack() as stack:
        def load(name):
            path = spec.get(name)
            return stack.enter_context(open_checkpoint(path)) if path else None

        yield Models(load("a"), load("b"), load("c"))


def _restrict(plan, subset):
    """Merge only `subset` of the plan's computed keys; the others are copied from A (like seed_ref's `keys`)."""
    from lib_merge.core.engine import COPY_A, MERGE

    if subset is None:
        return plan
    keep = set(subset)
    jobs = tuple(j if j.kind != MERGE or j.key in keep else dataclasses.replace(j, kind=COPY_A) for j in plan.jobs)
    return dataclasses.replace(plan, jobs=jobs)


def _preload_live(path):
    """The "loaded model": A's tensors in ordinary (already touched) memory, as the WebUI holds them."""
    from lib_merge.io.checkpoint import open_checkpoint

    with open_checkpoint(path) as a:
        return {k: a.get(k) for k in a.keys()}


def _import_ours():
    """Import everything the timed part uses, so that no import lands inside the clock."""
    import lib_merge.core.engine  # noqa: F401
    import lib_merge.core.recipe  # noqa: F401
    import lib_merge.io.checkpoint  # noqa: F401


def op_ours_dict(spec):
    from lib_merge.core.engine import DictSink, plan_merge, run_merge

    _import_ours()

    t0, c0 = time.perf_counter(), time.process_time()
    with _open_models(spec) as models:
        plan = _restrict(plan_merge(_recipe(spec), models), spec.get("subset"))
        kw = {"device": spec["device"]} if spec.get("device") else {}
        state = run_merge(plan, models, DictSink(), threads=spec.get("threads"), **kw)
        if spec.get("device"):
            import torch

            torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    _check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu, "merged": plan.merged}


def op_ours_live(spec):
    from lib_merge.core.engine import TensorSink, plan_merge, run_merge

    _import_ours()
    live = _preload_live(spec["a"])
    t0, c0 = time.perf_counter(), time.process_time()
    with _open_models(spec) as models:
        plan = plan_merge(_recipe(spec), models)
        sink = TensorSink(live)
        run_merge(plan, models, sink, threads=spec.get("threads"))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    _check_keys_save(live, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu, "extra_keys": len(sink.extra)}


def op_ours_file(spec):
    from lib_merge.io.checkpoint import SaveOptions
    from lib_merge.io.hashes import HashCache
    from lib_merge.service.pipeline import merge_to_file

    _import_ours()
    t0, c0 = time.perf_counter(), time.process_time()
    merge_to_file(_recipe(spec), spec["out"], SaveOptions(), overwrite=True, metadata=True,
                  hashes=HashCache(spec["hash_cache"]), threads=spec.get("threads"))
    return {"time": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def op_ours_cli(spec):
    """Inline only (the subprocess runner starts the CLI itself): `python -m lib_merge merge ...` in-process."""
    from lib_merge.cli import main as cli

    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = spec["xdg"]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(cli_args(spec))
    finally:
        if old is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = old
    if rc != 0:
        raise RuntimeError(f"CLI exited with {rc}")
    return {"time": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def cli_args(spec) -> list[str]:
    args = ["merge", "--model-a", spec["a"], "--model-b", spec["b"], "--mode", spec.get("mode", "Weight sum"),
            "--alpha", str(spec.get("alpha", 0.5)), "--output", spec["out"], "--overwrite", "--no-history", "--quiet"]
    if spec.get("c"):
        args += ["--model-c", spec["c"]]
    if spec.get("weights"):
        args += ["--mbw", spec["weights"]]
    if spec.get("calc", "normal") != "normal":
        args += ["--calc", spec["calc"]]
    return args


def op_ours_remerge(spec):
    """Full merge into the live tensors, then for each block: change its weight, re-merge only the changed jobs."""
    import torch
    from seed_ref import BLOCKS_26, block_sd1

    from lib_merge.core.engine import ScratchPool, TensorSink, changed_jobs, plan_merge, run_merge

    _import_ours()
    live = _preload_live(spec["a"])
    pool = ScratchPool()  # as an X/Y/Z plot does: buffers kept from merge to merge
    weights = [float(w) for w in spec["weights"].split(",")]
    remerges = []
    t0, c0 = time.perf_counter(), time.process_time()
    with _open_models(spec) as models:  # kept open between merges, as MergeService keeps its sources
        plan = plan_merge(_recipe(spec), models)
        run_merge(plan, models, TensorSink(live), scratch=pool)
        full, cpu = time.perf_counter() - t0, time.process_time() - c0
        for block in spec["blocks"]:
            weights[BLOCKS_26.index(block)] = round(weights[BLOCKS_26.index(block)] + REMERGE_DELTA, 4)
            new_spec = dict(spec, weights=",".join(f"{w:g}" for w in weights))
            t0 = time.perf_counter()
            new_plan = plan_merge(_recipe(new_spec), models)
            delta = changed_jobs(plan, new_plan)
            run_merge(delta, models, TensorSink(live), scratch=pool)
            dt = time.perf_counter() - t0
            numel = sum(live[j.key].numel() for j in delta.jobs if j.key in live)
            remerges.append({"block": block, "time": dt, "jobs": len(delta.jobs), "numel": numel})
            plan = new_plan
    # independent check: every check key must equal lerp(A, B, w_block) in fp32, rounded once (the seed's formula)
    from safetensors import safe_open

    worst = 0.0
    with safe_open(spec["a"], "pt") as fa, safe_open(spec["b"], "pt") as fb:
        for key in spec.get("check_keys", []):
            w = weights[BLOCKS_26.index(block_sd1(key))]
            expect = torch.lerp(fa.get_tensor(key).float(), fb.get_tensor(key).float(), w).to(live[key].dtype)
            worst = max(worst, (live[key].double() - expect.double()).abs().max().item())
    total_numel = sum(t.numel() for t in live.values())
    return {"time": full, "cpu": cpu, "full": full, "remerges": remerges, "numel": total_numel, "check_max_abs": worst}


def _seed_logger():
    stages = []

    def log(msg: str):
        head, _, name = msg.strip().partition(" s  ")
        stages.append((name.strip(), float(head)))

    return stages, log


def _stage_time(stages, name):
    names = [s[0] for s in stages]
    if name not in names:
        return None
    i = names.index(name)
    return stages[i][1] - (stages[i - 1][1] if i else 0.0)


def _timed_smooth(per_key):
    """Wrap seed_ref's smoothAdd kernel to record each key's time (its algorithm is unchanged)."""
    import seed_ref

    original = seed_ref._smooth_add

    def wrapped(a, d, alpha):
        t0 = time.perf_counter()
        out = original(a, d, alpha)
        per_key.append((tuple(a.shape), time.perf_counter() - t0))
        return out

    seed_ref._smooth_add = wrapped


def op_seed_mem(spec):
    from seed_ref import seed_merge

    per_key = []
    if spec.get("calc") == "smoothAdd":
        _timed_smooth(per_key)
    stages, log = _seed_logger()
    t0, c0 = time.perf_counter(), time.process_time()
    state = seed_merge(spec["a"], spec["b"], spec.get("c"), spec.get("mode", "Weight sum"), spec.get("calc", "normal"),
                       spec.get("alpha", 0.5), spec.get("beta", 0.25), spec.get("weights"), keys=spec.get("subset"),
                       log=log)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    _check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu, "stages": stages, "stage1": _stage_time(stages, "stage 1"), "per_key": per_key}


def _fsync_time(path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def op_seed_save(spec):
    from seed_ref import seed_merge, seed_save

    stages, log = _seed_logger()
    t0, c0 = time.perf_counter(), time.process_time()
    state = seed_merge(spec["a"], spec["b"], spec.get("c"), spec.get("mode", "Weight sum"), spec.get("calc", "normal"),
                       spec.get("alpha", 0.5), spec.get("beta", 0.25), spec.get("weights"), log=log)
    t1 = time.perf_counter()
    seed_save(state, spec["out"])
    t2, cpu = time.perf_counter(), time.process_time() - c0
    return {"time": t2 - t0, "cpu": cpu, "merge": t1 - t0, "save": t2 - t1, "fsync_after": _fsync_time(spec["out"])}


def _mecha_call(spec, output):
    import mecha_ref

    a, b, c = spec["a"], spec.get("b"), spec.get("c")
    op = spec["mecha_op"]
    if op == "weight_sum":
        return mecha_ref.weight_sum(a, b, alpha=spec.get("alpha", 0.5), weights=spec.get("weights"), output=output)
    if op == "add_difference":
        return mecha_ref.add_difference(a, b, c, alpha=spec.get("alpha", 0.5), output=output)
    if op == "train_difference":
        return mecha_ref.train_difference(a, b, c, alpha=spec.get("alpha", 0.5), output=output)
    if op == "cosine":
        return mecha_ref.cosine(a, b, alpha=spec.get("alpha", 0.0), variant="a", output=output)
    raise ValueError(op)


def op_mecha_mem(spec):
    import mecha_ref  # noqa: F401  (imports sd_mecha before the clock starts)

    t0, c0 = time.perf_counter(), time.process_time()
    state = _mecha_call(spec, None)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    _check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu}


def op_mecha_save(spec):
    import mecha_ref  # noqa: F401

    if os.path.exists(spec["out"]):
        os.remove(spec["out"])
    t0, c0 = time.perf_counter(), time.process_time()
    _mecha_call(spec, spec["out"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"time": dt, "cpu": cpu, "fsync_after": _fsync_time(spec["out"])}


OPS = {
    "ours_dict": op_ours_dict,
    "ours_live": op_ours_live,
    "ours_file": op_ours_file,
    "ours_cli": op_ours_cli,
    "ours_remerge": op_ours_remerge,
    "seed_mem": op_seed_mem,
    "seed_save": op_seed_save,
    "mecha_mem": op_mecha_mem,
    "mecha_save": op_mecha_save,
}


def child_main(spec: dict) -> dict:
    import torch

    result = OPS[spec["op"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    result["maxrss"] = _maxrss()
    return result


# ============================================================================================ parent side
def _warm(paths) -> float:
    """Read files once so they are in the page cache for every contender (like `cat f > /dev/null`)."""
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over `seconds` while this harness idles: other processes' load (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        return parts[3] + parts[4], sum(parts)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _wait_quiet(limit: float, threshold: float = 0.25) -> float | None:
    """Wait (up to `limit` s) until other processes use under `threshold` of the CPUs; return the last reading."""
    start = time.perf_counter()
    busy = _cpu_busy()
    while busy is not None and busy > threshold and time.perf_counter() - start < limit:
        busy = _cpu_busy(2.0)
    return busy


def _sync():
    with contextlib.suppress(AttributeError, OSError):
        os.sync()


def run_subprocess(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, str, float, object]:
    """Run `cmd`; return (exit code, stdout, wall seconds, its resource usage: ru_maxrss, ru_utime, ...)."""
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            proc.stdout.close()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.write(out)
    return proc.returncode, out.decode(errors="replace"), wall, usage


@dataclasses.dataclass
class Contender:
    label: str
    kind: str  # "ours", "seed", "mecha"
    spec: dict
    runs: int
    inputs: list[str]
    warm: bool = True


@dataclasses.dataclass
class Measure:
    time: float | None
    rss: int | None
    data: dict
    error: str | None = None


class Runner:
    def __init__(self, workdir: Path, inline: bool, timeout: float, verbose: bool = True, quiet_wait: float = 0):
        self.workdir, self.inline, self.timeout, self.verbose = workdir, inline, timeout, verbose
        self.quiet_wait = quiet_wait
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def say(self, msg: str):
        if self.verbose:
            print(msg, flush=True)

    def measure(self, task: str, c: Contender, run: int) -> Measure:
        _sync()
        if c.warm:
            _warm(c.inputs)
        busy = _wait_quiet(self.quiet_wait) if self.quiet_wait > 0 else None
        spec = dict(c.spec)
        if run != 0:
            spec.pop("check_path", None)
        log_path = self.logs / f"{task}__{c.label.replace(' ', '_').replace('/', '_')}.log"
        load = os.getloadavg()[0]
        try:
            if self.inline:
                t0 = time.perf_counter()
                data = child_main(spec)
                wall = time.perf_counter() - t0
                rss = None
            elif spec["op"] == "ours_cli":
                env = dict(os.environ, XDG_DATA_HOME=spec["xdg"])
                cmd = [sys.executable, "-m", "lib_merge", *cli_args(spec)]
                rc, out, wall, usage = run_subprocess(cmd, env, log_path, self.timeout)
                rss = usage.ru_maxrss * 1024
                if rc != 0:
                    raise RuntimeError(f"CLI exited with {rc}; see {log_path}")
                data = {"time": wall, "cpu": usage.ru_utime + usage.ru_stime, "cli_stdout": out.strip()}
                found = re.search(r"tensors merged, ([0-9.]+) s", out)
                if found:
                    data["cli_reported"] = float(found.group(1))
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
                rc, out, wall, usage = run_subprocess(cmd, dict(os.environ), log_path, self.timeout)
                rss = usage.ru_maxrss * 1024
                lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
                if rc != 0 or not lines:
                    raise RuntimeError(f"child exited with {rc}; see {log_path}")
                data = json.loads(lines[-1][len(MARK):])
                if "error" in data:
                    raise RuntimeError(data["error"])
            data["process_wall"] = wall
            data["load"] = load
            data["busy"] = busy
            m = Measure(data["time"], rss, data)
        except Exception as e:  # a failing contender is reported, the others go on
            m = Measure(None, None, {}, f"{type(e).__name__}: {e}")
        rss_txt = f"{m.rss / GB:.2f} GB" if m.rss else "n/a"
        self.say(f"  [{task}] run {run + 1} {c.label}: "
                 + (f"{m.time:.2f} s, peak RSS {rss_txt}" if m.error is None else f"FAILED {m.error}"))
        return m


# -------------------------------------------------------------------------------------------- checks
def _ulp16(x):
    """fp16 ulp at |x| (subnormal spacing below 2^-14)."""
    import torch

    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return torch.pow(2.0, e - 10)


def compare(test: dict, ref: dict) -> dict:
    """Over the keys both hold: max abs difference; the largest difference in fp16 ulps of the reference element
    (strict: near-zero elements have tiny ulps) and in fp16 ulps at the key's largest magnitude (its scale); the
    share of elements that differ; how many keys are bit-identical."""
    import torch

    keys = [k for k in ref if k in test and test[k].is_floating_point() and ref[k].is_floating_point()]
    worst, ulps_el, ulps_key, identical, shape_mismatch, differ, total = 0.0, 0.0, 0.0, 0, [], 0, 0
    for k in keys:
        t, r = test[k].double(), ref[k].double()
        if t.shape != r.shape:
            shape_mismatch.append(k)
            continue
        if not r.numel():
            continue
        d = (t - r).abs()
        worst = max(worst, d.max().item())
        ulps_el = max(ulps_el, (d / _ulp16(r)).max().item())
        ulps_key = max(ulps_key, (d.max() / _ulp16(r.abs().max())).item())
        differ += int((d != 0).sum())
        total += d.numel()
        identical += bool(test[k].dtype == ref[k].dtype and torch.equal(test[k], ref[k]))
    return {"keys": len(keys), "max_abs": worst, "max_ulps": ulps_el, "max_ulps_key": ulps_key,
            "differ": differ / total if total else 0.0, "identical": identical, "shape_mismatch": shape_mismatch}


def load_checks(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path)) if path and Path(path).exists() else {}


def extract_keys(path, keys, dest) -> None:
    """Copy `keys` of an output file into a small check file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        have = set(f.keys())
        save_file({k: f.get_tensor(k).contiguous() for k in keys if k in have}, str(dest))


def formula_add_difference(paths, keys, alpha) -> dict:
    """A + α(B − C) in float64 from the inputs (the exact value both engines round)."""
    from safetensors import safe_open

    out = {}
    with safe_open(paths["A"], "pt") as fa, safe_open(paths["B"], "pt") as fb, safe_open(paths["C"], "pt") as fc:
        for k in keys:
            out[k] = fa.get_tensor(k).double() + alpha * (fb.get_tensor(k).double() - fc.get_tensor(k).double())
    return out


# -------------------------------------------------------------------------------------------- model facts
def shapes_of(path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


CHECK_PATTERNS = (
    "model.diffusion_model.time_embed.0.weight",
    ".0.in_layers.2.weight",  # a 3x3 conv in a ResBlock (4-D)
    "attn1.to_q.weight",
    "model.diffusion_model.middle_block.1.proj_in.bias",
    ".0.out_layers.3.weight",
    "mlp.fc1.weight",  # text encoder
    "first_stage_model.decoder.up.1.block.0.conv1.weight",  # VAE
    "model.diffusion_model.out.2.weight",
)


def pick_check_keys(shapes: dict) -> list[str]:
    keys = []
    for pat in CHECK_PATTERNS:
        for k, s in shapes.items():
            if pat in k and len(s) > 0 and k not in keys:
                keys.append(k)
                break
    return keys


def merge_candidates(shapes: dict) -> list[str]:
    """Keys the seed's Stage 1 merges (§2.2 filter), in A's order."""
    return [k for k in shapes if "model" in k and ("weight" in k or "bias" in k)]


def smooth_subset(shapes: dict, step: int) -> list[str]:
    """Every `step`-th key of each tensor rank (so 3x3 convs and matrices are both represented), in A's order."""
    cands = merge_candidates(shapes)
    chosen = set()
    for rank in sorted({len(shapes[k]) for k in cands}):
        chosen.update([k for k in cands if len(shapes[k]) == rank][step // 2::step])
    return [k for k in cands if k in chosen]


# ============================================================================================ tasks
@dataclasses.dataclass
class TaskResult:
    name: str
    title: str
    rows: dict = dataclasses.field(default_factory=dict)  # label -> {"kind", "measures": [Measure]}
    ratios: list = dataclasses.field(default_factory=list)  # (ours, baseline, ratio|None, note)
    checks: list = dataclasses.field(default_factory=list)  # (what, compare dict | str)
    notes: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)  # dicts: name, value, goal, met, text
    extra: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def median_time(row) -> float | None:
    ts = [m.time for m in row["measures"] if m.time is not None]
    return statistics.median(ts) if ts else None


def median_cpu(row) -> float | None:
    cs = [m.data.get("cpu") for m in row["measures"] if m.data.get("cpu") is not None]
    return statistics.median(cs) if cs else None


def max_rss(row) -> int | None:
    rs = [m.rss for m in row["measures"] if m.rss]
    return max(rs) if rs else None


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
        self.mecha = (not args.no_mecha) and _has_mecha()
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

    # ---------------------------------------------------------------- tasks
    def task_ws_mem(self, res):
        spec = self.base_spec(weights=W26_TEXT, mecha_op="weight_sum")
        cs = [self.contender(res.name, "ours → new dict", "ours", "ours_dict", spec, fast=True),
              self.contender(res.name, "ours → live tensors", "ours", "ours_live", spec, fast=True),
              self.contender(res.name, "seed", "seed", "seed_mem", spec, fast=True)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha", "mecha", "mecha_mem", spec))
        self.cuda_contender(res, cs, spec)
        self.run_task(res, cs)
        for ours in ("ours → new dict", "ours → live tensors"):
            r = self.ratio(res, ours, "seed")
            self.target(res, f"{ours} vs seed ≥ 5x", r, 5, True)
            if self.mecha:
                r = self.ratio(res, ours, "sd-mecha")
                self.target(res, f"{ours} vs sd-mecha ≥ 15x", r, 15, True)
        for lab in ("ours → new dict", "ours → live tensors", "sd-mecha"):
            if lab in res.rows:
                self.check(res, lab, "seed")
        res.notes.append("Weights (BASE first): " + W26_TEXT + ". sd-mecha gets the same per-key weights through the "
                         "seed's block mapping (bench/mecha_ref.py, mapping='seed').")
        res.notes.append("'ours → new dict' is the like-for-like comparison and what the WebUI tab does today: the "
                         "service merges into a new dict and the host loads it with load_state_dict, as the seed "
                         "loads its dict (that load is outside the clock for everyone). 'ours → live tensors' merges "
                         "into a dict of A's tensors loaded before the clock starts (TensorSink): what the engine "
                         "can do for a host that accepts writes into the model's own tensors; the A1111 host does "
                         "not use it yet, because load_state_dict is where the Lora extension resets its backups.")

    def task_ws_save(self, res):
        spec = self.base_spec(weights=W26_TEXT, mecha_op="weight_sum")
        self.warm_hashes([spec["a"], spec["b"]])
        cs = [self.contender(res.name, "ours CLI (process)", "ours", "ours_cli", spec, out=True),
              self.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, out=True),
              self.contender(res.name, "seed merge + save", "seed", "seed_save", spec, out=True)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                   out=True))
        self.run_task(res, cs)
        rep = [m.data["cli_reported"] for m in res.rows["ours CLI (process)"]["measures"] if "cli_reported" in m.data]
        if rep:
            res.notes.append(f"The CLI's own report of its merge time (inside the process): median "
                             f"{statistics.median(rep):.2f} s.")
        for ours in ("ours CLI (process)", "ours merge_to_file"):
            r = self.ratio(res, ours, "seed merge + save")
            self.target(res, f"{ours} vs seed ≥ 3x", r, 3, True)
            if self.mecha:
                r = self.ratio(res, ours, "sd-mecha streamed")
                self.target(res, f"{ours} vs sd-mecha > 1x", r, 1.0, True)
        for lab in ("ours CLI (process)", "ours merge_to_file", "sd-mecha streamed"):
            if lab in res.rows:
                self.check(res, lab, "seed merge + save")
        self._save_notes(res)
        res.notes.append("The CLI row is the whole process seen from outside (interpreter start and imports, about "
                         "1.5 s here, included); every other row is timed inside its process after the imports.")

    def _save_notes(self, res):
        fs = []
        for lab, row in res.rows.items():
            f = [m.data.get("fsync_after") for m in row["measures"] if m.data.get("fsync_after") is not None]
            if f:
                fs.append(f"{lab}: {statistics.median(f):.2f} s")
        res.notes.append("Ours writes atomically and fsyncs the file before the rename, inside its time; the seed's "
                         "save_file and sd-mecha do not fsync. An fsync right after their run (not in their time) "
                         "took " + ("; ".join(fs) if fs else "n/a") + ". Metadata: ours hashes the inputs (sha256 "
                         "and legacy hash) from a warm hash cache, as on any merge after the first.")

    def task_adddiff_mem(self, res):
        p = self.models("sd1")
        spec = self.base_spec(c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
        cs = [self.contender(res.name, "ours → new dict", "ours", "ours_dict", spec),
              self.contender(res.name, "seed", "seed", "seed_mem", spec)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha", "mecha", "mecha_mem", spec))
        self.cuda_contender(res, cs, spec)
        self.run_task(res, cs)
        r = self.ratio(res, "ours → new dict", "seed")
        self.target(res, "ours vs seed ≥ 5x", r, 5, True)
        if self.mecha:
            self.ratio(res, "ours → new dict", "sd-mecha")
        self._adddiff_checks(res, spec, "ours → new dict", "seed", "sd-mecha")

    def _adddiff_checks(self, res, spec, ours, seed, mecha):
        exact = formula_add_difference({"A": spec["a"], "B": spec["b"], "C": spec["c"]}, spec["check_keys"],
                                       spec["alpha"])
        for lab in (ours, mecha, seed):
            if lab and lab in res.rows:
                self.check(res, lab, "", f"{lab} vs exact A + α(B − C) (float64)", ref=exact)
        if seed:
            for lab in (ours, mecha):
                if lab in res.rows:
                    self.check(res, lab, seed)
        res.notes.append("Ours (and sd-mecha) compute A + α(B − C) in fp32 and round once; the seed rounds B − C to "
                         "fp16 first (Stage 0) and then adds in fp16, so it differs by up to 2 fp16 ulps and is the "
                         "one further from the exact value.")

    def task_adddiff_save(self, res):
        p = self.models("sd1")
        spec = self.base_spec(c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
        self.warm_hashes([spec["a"], spec["b"], spec["c"]])
        cs = [self.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, out=True),
              self.contender(res.name, "seed merge + save", "seed", "seed_save", spec, out=True)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                   out=True))
        self.run_task(res, cs)
        r = self.ratio(res, "ours merge_to_file", "seed merge + save")
        self.target(res, "ours vs seed ≥ 5x (Add difference target, here with the save)", r, 5, True)
        if self.mecha:
            self.ratio(res, "ours merge_to_file", "sd-mecha streamed")
        self._adddiff_checks(res, spec, "ours merge_to_file", "seed merge + save", "sd-mecha streamed")
        self._save_notes(res)

    def task_traindiff(self, res):
        p = self.models("sd1")
        spec = self.base_spec(c=p["C"], mode="Add difference", calc="trainDifference", alpha=ALPHA_TRAIN,
                              mecha_op="train_difference")
        cs = [self.contender(res.name, "ours → new dict", "ours", "ours_dict", spec),
              self.contender(res.name, "seed", "seed", "seed_mem", spec)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha", "mecha", "mecha_mem", spec))
        self.run_task(res, cs)
        self.ratio(res, "ours → new dict", "seed")
        if self.mecha:
            self.ratio(res, "ours → new dict", "sd-mecha")
        for lab in ("ours → new dict", "sd-mecha"):
            if lab in res.rows:
                self.check(res, lab, "seed")
        res.notes.append("The seed leaves trainDifference keys in fp32 (A's fp16 + an fp32 term); ours and sd-mecha "
                         "write A's dtype (fp16), so up to 0.5 fp16 ulp of difference is the rounding itself. The "
                         "issue sets no numeric target for this task.")

    def task_cosineA(self, res):
        spec = self.base_spec(calc="cosineA", alpha=ALPHA_COS, mecha_op="cosine")
        cs = [self.contender(res.name, "ours → new dict", "ours", "ours_dict", spec),
              self.contender(res.name, "seed", "seed", "seed_mem", spec)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha add_cosine_a", "mecha", "mecha_mem", spec))
        self.run_task(res, cs)
        self.ratio(res, "ours → new dict", "seed")
        if self.mecha:
            res.ratios.append(("ours → new dict", "sd-mecha add_cosine_a", None,
                               "not the same operation: no ratio"))
        self.check(res, "ours → new dict", "seed")
        if self.mecha:
            self.check(res, "sd-mecha add_cosine_a", "seed",
                       "sd-mecha add_cosine_a vs seed (expected to differ: another algorithm)")
        res.notes.append("sd-mecha's add_cosine_a is a different algorithm (per-key clamp(sim − α), no model-wide "
                         "similarity range, no magnitude term, VAE merged): timed for reference only, no ratio. "
                         "The issue sets no numeric target for this task.")

    def task_smoothadd(self, res):
        p = self.models("sd1")
        shapes = shapes_of(p["A"])
        step = self.args.smooth_step
        subset = smooth_subset(shapes, step)
        spec = self.base_spec(c=p["C"], mode="Add difference", calc="smoothAdd", alpha=ALPHA_SMOOTH)
        spec["check_keys"] = subset
        ours_spec = dict(spec, calc="smoothAdd MT")
        cs = [self.contender(res.name, "seed (key subset)", "seed", "seed_mem", dict(spec, subset=subset)),
              self.contender(res.name, "ours MT (same key subset)", "ours", "ours_dict",
                             dict(ours_spec, subset=subset))]
        full_runs = self.args.smooth_full_runs
        if full_runs > 0:
            cs.append(self.contender(res.name, "ours MT (full model)", "ours", "ours_dict", ours_spec, runs=full_runs))
        self.run_task(res, cs)
        # scale the seed's subset time to the whole model, per tensor rank (a 3x3 conv costs ~8x a matrix per element)
        cands = merge_candidates(shapes)
        numel = {k: math.prod(shapes[k]) for k in cands}
        by_rank_full, by_rank_sub = {}, {}
        for k in cands:
            by_rank_full[len(shapes[k])] = by_rank_full.get(len(shapes[k]), 0) + numel[k]
        for k in subset:
            by_rank_sub[len(shapes[k])] = by_rank_sub.get(len(shapes[k]), 0) + numel[k]
        estimates = []
        for m in res.rows["seed (key subset)"]["measures"]:
            if m.time is None:
                continue
            per_rank = {}
            for shape, dt in m.data.get("per_key", []):
                per_rank[len(shape)] = per_rank.get(len(shape), 0.0) + dt
            kernel = sum(per_rank.values())
            scaled = sum(dt * by_rank_full[r] / by_rank_sub[r] for r, dt in per_rank.items() if by_rank_sub.get(r))
            estimates.append(m.time - kernel + scaled)
            m.data["scaled_full"] = m.time - kernel + scaled
            m.data["kernel_subset"] = kernel
        seed_full = statistics.median(estimates) if estimates else None
        res.extra["seed_full_estimate"] = seed_full
        res.rows["seed (scaled to the full model)"] = {
            "kind": "seed", "measures": [Measure(m.data.get("scaled_full"), None, {}) for m in
                                         res.rows["seed (key subset)"]["measures"] if m.time is not None],
            "derived": True}
        frac = sum(by_rank_sub.values()) / sum(by_rank_full.values())
        rank_txt = ", ".join(f"{r}-D: {by_rank_sub.get(r, 0) / 1e6:.1f} M of {by_rank_full[r] / 1e6:.1f} M elements"
                             for r in sorted(by_rank_full))
        res.notes.append(
            f"The seed's single-threaded scipy smoothAdd over every key would take well over 10 minutes, so it is "
            f"timed on a deterministic subset: every {step}th key of each tensor rank ({len(subset)} keys, "
            f"{frac:.1%} of the merged elements; {rank_txt}). The scaled figure is the run's total time minus the "
            f"subset's kernel time "
            f"plus each rank's kernel time × (that rank's elements in the model / in the subset); loads and Stage 0 "
            f"(B − C over the whole model) are measured, not scaled.")
        if full_runs > 0:
            r = self.ratio(res, "ours MT (full model)", "seed (scaled to the full model)")
            self.target(res, "ours (full model) vs seed (scaled) ≥ 10x", r, 10, True)
            res.notes.append(f"Ours was run on the full model ({full_runs} run(s)): it takes minutes too.")
        else:
            r = self.ratio(res, "ours MT (same key subset)", "seed (key subset)",
                           "subset vs subset: fixed costs (loads, copies) included on both sides")
            self.target(res, "ours vs seed on the same key subset ≥ 10x (no full run of ours)", r, 10, True)
        self.ratio(res, "ours MT (same key subset)", "seed (key subset)", "same keys, whole process time")
        for lab in ("ours MT (same key subset)", "ours MT (full model)"):
            if lab in res.rows:
                self.check(res, lab, "seed (key subset)", f"{lab} vs seed, on all {len(subset)} timed keys")
        res.notes.append("The seed filters B − C after rounding it to fp16 (Stage 0) and leaves the result in fp32; "
                         "ours filters the fp32 difference and rounds the result once to fp16. Differences of up to "
                         "about 1 fp16 ulp of the result are these roundings.")

    def task_remerge(self, res):
        spec = self.base_spec(weights=W26_TEXT, blocks=list(REMERGE_BLOCKS))
        cs = [self.contender(res.name, "ours", "ours", "ours_remerge", spec, check=False, fast=True)]
        self.run_task(res, cs)
        row = res.rows["ours"]
        ms = [m for m in row["measures"] if m.time is not None]
        res.rows["ours"]["label_time"] = "full merge into live tensors"
        if not ms:
            return
        total = ms[0].data["numel"]
        for i, block in enumerate(REMERGE_BLOCKS):
            times = [m.data["remerges"][i]["time"] for m in ms]
            pct = [100 * m.data["remerges"][i]["time"] / m.data["full"] for m in ms]
            numel = ms[0].data["remerges"][i]["numel"]
            lab = f"re-merge {block} ({numel / total:.1%} of the elements)"
            res.rows[lab] = {"kind": "ours", "measures": [Measure(t, None, {}) for t in times], "derived": True}
            res.extra.setdefault("remerge", []).append({"block": block, "pct": statistics.median(pct),
                                                        "jobs": ms[0].data["remerges"][i]["jobs"]})
            if block != "BASE":
                self.target(res, f"re-merge {block} ≤ 10 % of the full merge", statistics.median(pct), 10, False,
                            unit="%")
        worst = max(m.data["check_max_abs"] for m in ms)
        res.checks.append(("live tensors after the re-merges vs lerp(A, B, w) rounded once (seed formula, seed's "
                           "block mapping), on the check keys", f"max abs diff {worst:.3g}"))
        pcts = ", ".join(f"{e['block']}: {e['pct']:.1f} % ({e['jobs']} keys)" for e in res.extra["remerge"])
        res.notes.append(f"Per run: one full Weight-sum merge into A's loaded tensors (TensorSink), then the blocks "
                         f"{', '.join(REMERGE_BLOCKS)} each get +{REMERGE_DELTA} in turn; every re-merge plans the new "
                         f"recipe, takes changed_jobs and merges those into the same tensors. The model files stay "
                         f"open from merge to merge (the full merge's time includes opening them), as MergeService "
                         f"keeps them. "
                         f"Median share of the full merge: {pcts}. BASE (text encoder and VAE, 19 % of the weights) "
                         f"is shown but not held to the 10 % target.")

    def task_sdxl(self, res):
        p = self.models("sdxl")
        spec = self.base_spec("sdxl", c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
        inputs = [p["A"], p["B"], p["C"]]
        self.warm_hashes(inputs)
        runs = self.args.sdxl_runs
        free = _mem_total()
        warm = sum(os.path.getsize(x) for x in inputs) < 0.6 * free
        cs = [self.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, runs=runs, out=True,
                             warm=warm)]
        self.mecha_or_note(res, cs, self.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                   runs=runs, out=True, warm=warm))
        res.notes.append("The seed's way (three full models in memory) needs about 21 GB resident (21.6 GB measured, "
                         "ARCHITECTURE.md); on this 24 GB machine that risks the OOM killer, so it is not run.")
        self.run_task(res, cs)
        rss = max_rss(res.rows["ours merge_to_file"])
        self.target(res, "ours peak RSS ≤ 9 GB", rss / GB if rss else None, 9, False, unit="GB")
        if self.mecha:
            self.ratio(res, "ours merge_to_file", "sd-mecha streamed")
        self._adddiff_checks(res, spec, "ours merge_to_file", None, "sd-mecha streamed")
        if self.mecha:
            self.check(res, "ours merge_to_file", "sd-mecha streamed")
        if not warm:
            res.notes.append(f"The three inputs ({sum(os.path.getsize(x) for x in inputs) / GB:.1f} GB) do not fit "
                             f"the page cache next to a merge, so they were not pre-read: both contenders read "
                             f"partly from disk, in alternating order.")
        self._save_notes(res)

    # ---------------------------------------------------------------- driver
    def run(self, tasks):
        self.started = time.time()
        self.machine = machine_info()
        for name in tasks:
            res = TaskResult(name, TITLES[name])
            self.runner.say(f"== {name}: {res.title}")
            load0 = os.getloadavg()
            res.extra["git"] = _git_state()  # code measured: other sessions may commit while the harness runs
            t0 = time.perf_counter()
            try:
                getattr(self, f"task_{name}")(res)
            except Exception as e:
                res.skipped = f"task failed: {type(e).__name__}: {e}"
                traceback.print_exc()
            res.extra["seconds"] = time.perf_counter() - t0
            res.extra["settings"] = _settings(self.args, self.machine)
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


def _has_mecha() -> bool:
    import importlib.util

    return importlib.util.find_spec("sd_mecha") is not None


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib_merge"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        files = [ln[3:] for ln in dirty if ln.strip()]
        return head + (f" with uncommitted changes in {', '.join(files)}" if files else " (lib_merge clean)")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    import numpy
    import scipy
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "memory_gb": round(_mem_total() / 2**30, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "load_at_start": os.getloadavg(),
        "git": _git_state(),
    }
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except Exception:
        pass
    if _has_mecha():
        from importlib.metadata import version

        info["sd_mecha"] = version("sd-mecha")
    if info["cuda"]:
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


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


def _settings(args, machine) -> dict:
    return {"argv": list(args.argv), "runs": args.runs, "fast_runs": args.fast_runs, "sdxl_runs": args.sdxl_runs,
            "smooth_full_runs": args.smooth_full_runs, "date": machine.get("date"), "git": machine.get("git")}


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
        bench.parts.append(_settings(args, raw["machine"]))
        for t in raw["tasks"]:
            t["extra"].setdefault("settings", _settings(args, raw["machine"]))
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


# ============================================================================================ report
def _fmt_t(t):
    return "–" if t is None else (f"{t:.2f} s" if t < 100 else f"{t:.0f} s")


def _fmt_gb(b):
    return "–" if not b else f"{b / GB:.2f} GB"


def _fmt_cmp(c):
    if isinstance(c, str):
        return c
    if c["identical"] == c["keys"] and c["keys"]:
        return f"{c['keys']} keys: **bit-identical**"
    txt = (f"{c['keys']} keys: max abs diff {c['max_abs']:.3g} = {c['max_ulps_key']:.2f} fp16 ulp at the key's "
           f"scale ({c['max_ulps']:.1f} ulp of the element itself); {c['differ']:.2%} of elements differ")
    if c["identical"]:
        txt += f"; {c['identical']} keys bit-identical"
    if c["shape_mismatch"]:
        txt += f"; shape mismatch on {len(c['shape_mismatch'])} keys"
    return txt


def render(bench: Bench) -> str:
    m = getattr(bench, "machine", {}) or {}
    a = bench.args
    lines = ["# Benchmarks: Block Merger vs the seed algorithm and sd-mecha", ""]
    parts = getattr(bench, "parts", None) or [_settings(a, m)]
    for part in parts:
        cmd = "python bench/run.py" + (" " + " ".join(part["argv"]) if part["argv"] else "")
        lines.append(f"Generated by `{cmd}` on {part.get('date') or '?'} (code: {part.get('git') or '?'}).")
        lines.append("")
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    lines.append(f"- CPU: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; memory {m.get('memory_gb', '?')} GiB; "
                 f"{m.get('platform', '')}")
    lines.append(f"- Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} intra-op threads), "
                 f"numpy {m.get('numpy')}, scipy {m.get('scipy')}, safetensors {m.get('safetensors', '?')}, "
                 f"sd-mecha {m.get('sd_mecha', 'not installed') if bench.mecha else 'not used'}")
    if m.get("cuda"):
        lines.append(f"- CUDA device present: {m.get('cuda_device')}: the in-memory Weight sum and Add difference "
                     f"tasks also run ours with run_merge(device='cuda').")
    else:
        lines.append("- No CUDA device (torch.cuda.is_available() is False): CPU only.")
    la = m.get("load_at_start")
    if la:
        lines.append(f"- Load average when the run started: {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min); "
                     f"per-task load is in the task sections. The machine may be shared with other jobs.")
    lines.append(f"- Models: synthetic {'full-size' if a.factor == 1 else f'1/{a.factor}-size'} checkpoints from "
                 f"bench/make_models.py (fp16; B and C are A plus small noise), in {a.cache}.")
    lines.append(f"- {'Children inline (no RSS)' if a.inline else 'Each run in a fresh process'}; the number of "
                 f"runs of each task is given in its section.")
    lines.append("")
    lines += _method_lines()
    # summary
    lines.append("## Summary")
    lines.append("")
    lines.append("| Task | ours | seed | sd-mecha | seed / ours | sd-mecha / ours | peak RSS ours | peak RSS seed | "
                 "peak RSS sd-mecha |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in bench.results:
        if r.skipped:
            lines.append(f"| {r.name} | {r.skipped} | | | | | | | |")
            continue
        by_kind = {}
        for lab, row in r.rows.items():
            by_kind.setdefault(row["kind"], []).append(lab)
        cells = []
        for kind in ("ours", "seed", "mecha"):
            labs = by_kind.get(kind, [])
            cells.append("<br>".join(f"{_fmt_t(median_time(r.rows[x]))} ({x})" for x in labs) or "–")
        rat_s = "<br>".join(f"{ra:.2f}x ({o} vs {b})" for o, b, ra, _ in r.ratios
                            if ra is not None and r.rows.get(b, {}).get("kind") == "seed") or "–"
        rat_m = "<br>".join((f"{ra:.2f}x ({o})" if ra is not None else f"n/a: {n}") for o, b, ra, n in r.ratios
                            if r.rows.get(b, {}).get("kind") == "mecha") or "–"
        rss = []
        for kind in ("ours", "seed", "mecha"):
            labs = [x for x in by_kind.get(kind, []) if max_rss(r.rows[x])]
            rss.append("<br>".join(f"{_fmt_gb(max_rss(r.rows[x]))} ({x})" for x in labs) or "–")
        lines.append(f"| {r.title} | {cells[0]} | {cells[1]} | {cells[2]} | {rat_s} | {rat_m} | "
                     f"{' | '.join(rss)} |")
    lines.append("")
    lines.append("## Targets (issue 6)")
    lines.append("")
    busy = [x.data["busy"] for r in bench.results for row in r.rows.values() for x in row["measures"]
            if x.data.get("busy") is not None]
    if busy and max(busy) > 0.3:
        lines.append(f"**Caution:** other processes kept {min(busy):.0%}–{max(busy):.0%} of the CPUs busy when the "
                     f"runs started, so wall times and their ratios are distorted (the seed's many small OpenMP "
                     f"regions suffer most); see each task's CPU-time ratio and the notes at the end.")
        lines.append("")
    any_t = False
    for r in bench.results:
        for t in r.targets:
            any_t = True
            mark = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
            lines.append(f"- **{mark}** — {r.name}: {t['name']}: {t['text']}")
    if not any_t:
        lines.append("- (no targeted task was run)")
    lines.append("")
    lines.append("## Tasks")
    for r in bench.results:
        lines.append("")
        lines.append(f"### {r.name}: {r.title}")
        lines.append("")
        if r.skipped:
            lines.append(r.skipped)
            continue
        st = r.extra.get("settings")
        if st:
            lines.append(f"Runs: {st['runs']} per contender (fast tasks: {max(st['runs'], st['fast_runs'] or 0)} for "
                         f"ours and the seed; SDXL: {st['sdxl_runs']}; smoothAdd full model: "
                         f"{st['smooth_full_runs']}); part started {st.get('date') or '?'}; "
                         + (f"code at the task's start: {r.extra['git']}." if r.extra.get("git") else
                            f"code when the part started: {st.get('git') or '?'} (a task that started later may have "
                            f"measured newer commits)."))
            lines.append("")
        load = r.extra.get("load")
        if load:
            lines.append(f"Load average before / after: {load[0][0]:.2f} / {load[1][0]:.2f}; task took "
                         f"{r.extra.get('seconds', 0):.0f} s in all.")
            lines.append("")
        lines.append("| Contender | median wall | runs (s) | median CPU s | peak RSS (max over runs) | "
                     "others' CPU use at start |")
        lines.append("|---|---|---|---|---|---|")
        for lab, row in r.rows.items():
            runs = ", ".join("fail" if x.time is None else f"{x.time:.2f}" for x in row["measures"])
            errs = [x.error for x in row["measures"] if x.error]
            name = lab + (f" — {row['label_time']}" if row.get("label_time") else "")
            name += " (derived)" if row.get("derived") else ""
            cpus = [x.data.get("cpu") for x in row["measures"] if x.data.get("cpu") is not None]
            cpu = f"{statistics.median(cpus):.1f}" if cpus else "–"
            loads = ", ".join(f"{x.data['busy']:.0%}" for x in row["measures"] if x.data.get("busy") is not None)
            lines.append(f"| {name} | {_fmt_t(median_time(row))} | {runs} | {cpu} | {_fmt_gb(max_rss(row))} | "
                         f"{loads or '–'} |")
            for e in errs[:1]:
                lines.append(f"| ↳ error | {e} | | | | |")
        if r.ratios:
            lines.append("")
            lines.append("Ratios (baseline time / our time, same run set; > 1 means we are faster):")
            lines.append("")
            for o, b, ra, note in r.ratios:
                val = f"{ra:.2f}x" if ra is not None else "no ratio"
                lines.append(f"- {o} vs {b}: **{val}**" + (f" — {note}" if note else ""))
        if r.checks:
            lines.append("")
            lines.append("Result checks:")
            lines.append("")
            for what, c in r.checks:
                lines.append(f"- {what}: {_fmt_cmp(c)}")
        if r.notes:
            lines.append("")
            lines.append("Notes:")
            lines.append("")
            for n in r.notes:
                lines.append(f"- {n}")
    extra = getattr(bench.args, "appendix", None)
    if extra and Path(extra).exists():
        lines.append("")
        lines.append(Path(extra).read_text(encoding="utf-8").rstrip())
    lines.append("")
    return "\n".join(lines)


def _method_lines() -> list[str]:
    return [
        "## Method",
        "",
        "- Every measurement is a fresh process (`python bench/run.py --child …`). Times are taken inside it around "
        "the merge (open files → merged dict, or → file written), after the imports; the CLI is timed as a whole "
        "process. Peak RSS is that process's `ru_maxrss`.",
        "- Before each process the inputs are read once (page cache warm for everyone) and `os.sync()` flushes the "
        "previous output. Contenders alternate, the order rotating every run; medians are over the runs shown.",
        "- RSS counts what a process maps and touches: the seed's `load_file` maps the input files, so their pages "
        "count in its RSS; ours reads into reusable buffers and sd-mecha streams, so the page cache is not in theirs.",
        "- Correctness: after the timed part each contender saves a few keys (a conv, attention, norm, time "
        "embedding, text encoder, VAE), compared with the seed's result (max abs difference and fp16 ulps).",
        "- The machine is shared with other jobs. Before each run the harness waits (up to --quiet-wait s) for other "
        "processes to leave the CPUs and records how busy they were ('others' CPU use at start', from /proc/stat "
        "while the harness idles). 'CPU s' is the user+sys CPU time of the timed part (for the CLI: of the whole "
        "process); it is much less sensitive to other jobs than wall time, so it is shown next to it.",
        "",
    ]


# ============================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run each, smoothAdd on the key subset only, no SDXL")
    ap.add_argument("--tasks", default="", help=f"comma list of {', '.join(TASKS)} (adddiff = both Add difference)")
    ap.add_argument("--runs", type=int, default=None, help="runs per contender (default 3; --quick 1)")
    ap.add_argument("--fast-runs", type=int, default=5,
                    help="runs of ours and the seed in the fast tasks (ws_mem, remerge); default 5")
    ap.add_argument("--sdxl-runs", type=int, default=None, help="runs for the SDXL task (default 2; --quick 1)")
    ap.add_argument("--smooth-full-runs", type=int, default=None,
                    help="runs of ours smoothAdd on the full model (default 1; --quick 0)")
    ap.add_argument("--smooth-step", type=int, default=SMOOTH_STEP, help="seed smoothAdd: every n-th key per rank")
    ap.add_argument("--output", default=str(BENCH / "RESULTS.md"), help="report path (default bench/RESULTS.md)")
    ap.add_argument("--workdir", default=str(BENCH / "out"), help="outputs, check files, logs, results.json")
    ap.add_argument("--cache", default=str(BENCH / "cache"), help="where the synthetic models are (made if missing)")
    ap.add_argument("--factor", type=int, default=1, help="model size divisor (1 = full size)")
    ap.add_argument("--no-mecha", action="store_true", help="leave sd-mecha out")
    ap.add_argument("--inline", action="store_true", help="run contenders in this process (smoke tests; no RSS)")
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="before each run, wait up to this many seconds for other processes to leave the CPUs "
                         "(under 25%% busy); the reading is reported either way (default 20)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--appendix", default=str(BENCH / "RESULTS_NOTES.md"),
                    help="a markdown file appended to the report (profile findings), if it exists")
    ap.add_argument("--silent", action="store_true")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the report from WORKDIR/results.json (e.g. after editing the appendix)")
    ap.add_argument("--raw", default="", help="with --render-only: comma list of results.json files to combine")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.sdxl_runs is None:
        args.sdxl_runs = 1 if args.quick else 2
    if args.smooth_full_runs is None:
        args.smooth_full_runs = 0 if args.quick else 1
    names = []
    for t in (x.strip() for x in args.tasks.split(",") if x.strip()):
        for n in ALIASES.get(t, (t,)):
            if n not in TASKS:
                ap.error(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
            if n not in names:
                names.append(n)
    if not names:
        names = [t for t in TASKS if not (args.quick and t == "sdxl")]
    args.task_list = names
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        try:
            result = child_main(json.loads(args.child))
        except Exception as e:
            traceback.print_exc()
            print(MARK + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(MARK + json.dumps(result), flush=True)
        return 0
    bench = Bench(args)
    if args.render_only:
        raws = [Path(p) for p in args.raw.split(",") if p.strip()] or [bench.workdir / "results.json"]
        load_raw(bench, raws)
        bench.write_report(raw=False)
        print(f"wrote {args.output}")
        return 0
    bench.run(args.task_list)
    print(f"wrote {args.output}")
    for r in bench.results:
        for t in r.targets:
            mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            print(f"  {mark:7s} {r.name}: {t['name']}: {t['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
