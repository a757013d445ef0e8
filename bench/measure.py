"""How one measurement is taken. In the child: `child_main` runs one contender's op and adds its peak RSS. In the
parent: `Runner.measure` warms the inputs' pages, flushes earlier writes, waits for a quiet CPU and runs the child in
a fresh process (`python bench/run.py --child SPEC`), or inline for the smoke test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import contenders
from machine import ROOT
from results import GB, Measure
from tasks.remerge import op_ours_remerge

MARK = "@@BENCH@@ "  # the child's result line on stdout starts with this


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


OPS = {
    "ours_dict": contenders.op_ours_dict,
    "ours_live": contenders.op_ours_live,
    "ours_file": contenders.op_ours_file,
    "ours_cli": contenders.op_ours_cli,
    "ours_remerge": op_ours_remerge,
    "seed_mem": contenders.op_seed_mem,
    "seed_save": contenders.op_seed_save,
    "mecha_mem": contenders.op_mecha_mem,
    "mecha_save": contenders.op_mecha_save,
}


def child_main(spec: dict) -> dict:
    import torch

    result = OPS[spec["op"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    result["maxrss"] = _maxrss()
    return result


# -------------------------------------------------------------------------------- parent side
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
                cmd = [sys.executable, "-m", "lib_merge", *contenders.cli_args(spec)]
                rc, out, wall, usage = run_subprocess(cmd, env, log_path, self.timeout)
                rss = usage.ru_maxrss * 1024
                if rc != 0:
                    raise RuntimeError(f"CLI exited with {rc}; see {log_path}")
                data = {"time": wall, "cpu": usage.ru_utime + usage.ru_stime, "cli_stdout": out.strip()}
                found = re.search(r"tensors merged, ([0-9.]+) s", out)
                if found:
                    data["cli_reported"] = float(found.group(1))
            else:
                cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--child", json.dumps(spec)]
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
