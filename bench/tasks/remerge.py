"""One-block re-merge after a full merge, into A's loaded tensors: the child op that times it and the task."""

from __future__ import annotations

import statistics
import time

from contenders import import_ours, open_models, preload_live, recipe
from results import Measure

from tasks.ws import W26_TEXT

REMERGE_BLOCKS = ("IN04", "OUT01", "M00", "BASE")  # small, typical and largest U-Net block; BASE is 19 % of SD1
REMERGE_DELTA = 0.05


def op_ours_remerge(spec):
    """Full merge into the live tensors, then for each block: change its weight, re-merge only the changed jobs."""
    import torch
    from seed_ref import BLOCKS_26, block_sd1

    from lib_merge.core.engine import ScratchPool, TensorSink, changed_jobs, plan_merge, run_merge

    import_ours()
    live = preload_live(spec["a"])
    pool = ScratchPool()  # as an X/Y/Z plot does: buffers kept from merge to merge
    weights = [float(w) for w in spec["weights"].split(",")]
    remerges = []
    t0, c0 = time.perf_counter(), time.process_time()
    with open_models(spec) as models:  # kept open between merges, as MergeService keeps its sources
        plan = plan_merge(recipe(spec), models)
        run_merge(plan, models, TensorSink(live), scratch=pool)
        full, cpu = time.perf_counter() - t0, time.process_time() - c0
        for block in spec["blocks"]:
            weights[BLOCKS_26.index(block)] = round(weights[BLOCKS_26.index(block)] + REMERGE_DELTA, 4)
            new_spec = dict(spec, weights=",".join(f"{w:g}" for w in weights))
            t0 = time.perf_counter()
            new_plan = plan_merge(recipe(new_spec), models)
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


def remerge(bench, res):
    spec = bench.base_spec(weights=W26_TEXT, blocks=list(REMERGE_BLOCKS))
    cs = [bench.contender(res.name, "ours", "ours", "ours_remerge", spec, check=False, fast=True)]
    bench.run_task(res, cs)
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
            bench.target(res, f"re-merge {block} ≤ 10 % of the full merge", statistics.median(pct), 10, False,
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
