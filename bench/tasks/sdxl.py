"""SDXL three-model Add difference streamed to a file (the seed's way would not fit this machine's memory)."""

from __future__ import annotations

import os

from machine import mem_total
from results import GB, max_rss

from tasks.adddiff import ALPHA_ADD, adddiff_checks


def sdxl(bench, res):
    p = bench.models("sdxl")
    spec = bench.base_spec("sdxl", c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
    inputs = [p["A"], p["B"], p["C"]]
    bench.warm_hashes(inputs)
    runs = bench.args.sdxl_runs
    free = mem_total()
    warm = sum(os.path.getsize(x) for x in inputs) < 0.6 * free
    cs = [bench.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, runs=runs, out=True,
                          warm=warm)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                 runs=runs, out=True, warm=warm))
    res.notes.append("The seed's way (three full models in memory) needs about 21 GB resident (21.6 GB measured, "
                     "ARCHITECTURE.md); on this 24 GB machine that risks the OOM killer, so it is not run.")
    bench.run_task(res, cs)
    rss = max_rss(res.rows["ours merge_to_file"])
    bench.target(res, "ours peak RSS ≤ 9 GB", rss / GB if rss else None, 9, False, unit="GB")
    if bench.mecha:
        bench.ratio(res, "ours merge_to_file", "sd-mecha streamed")
    adddiff_checks(bench, res, spec, "ours merge_to_file", None, "sd-mecha streamed")
    if bench.mecha:
        bench.check(res, "ours merge_to_file", "sd-mecha streamed")
    if not warm:
        res.notes.append(f"The three inputs ({sum(os.path.getsize(x) for x in inputs) / GB:.1f} GB) do not fit "
                         f"the page cache next to a merge, so they were not pre-read: both contenders read "
                         f"partly from disk, in alternating order.")
    bench.save_notes(res)
