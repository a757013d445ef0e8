"""Side-by-side benchmarks of Block Merger against the seed's algorithm (bench/seed_ref.py) and sd-mecha.

    python bench/run.py                       # every task, 3 runs each, writes bench/RESULTS.md (about 30-40 min)
    python bench/run.py --quick               # 1 run each, smoothAdd on a key subset only, no SDXL
    python bench/run.py --tasks ws_mem,remerge --runs 5
    python bench/run.py --output /tmp/R.md --workdir /tmp/bench --cache /tmp/models --factor 16 --inline --no-mecha

The WebUI path (merge -> ready through the A1111 host, against the fake WebUI) is measured by bench/webui_live.py.

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
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from harness import Bench, load_raw  # noqa: E402  (needs bench/ on the path)
from measure import MARK, child_main  # noqa: E402
from tasks import ALIASES, TASKS, TITLES  # noqa: E402, F401  (the smoke test reads TASKS and TITLES from here)
from tasks.smooth import SMOOTH_STEP  # noqa: E402


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
