"""Weight sum with 26 block weights: in memory (ws_mem) and merged and saved (ws_save)."""

from __future__ import annotations

import statistics

# 26 block weights (BASE first), all strictly between 0 and 1 (the seed treats 0 and 1 as "keep A" / "take B").
W26 = [0.5] + [round(0.15 + 0.03 * i, 2) for i in range(25)]
W26_TEXT = ",".join(f"{w:g}" for w in W26)


def ws_mem(bench, res):
    spec = bench.base_spec(weights=W26_TEXT, mecha_op="weight_sum")
    cs = [bench.contender(res.name, "ours → new dict", "ours", "ours_dict", spec, fast=True),
          bench.contender(res.name, "ours → live tensors", "ours", "ours_live", spec, fast=True),
          bench.contender(res.name, "seed", "seed", "seed_mem", spec, fast=True)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha", "mecha", "mecha_mem", spec))
    bench.cuda_contender(res, cs, spec)
    bench.run_task(res, cs)
    for ours in ("ours → new dict", "ours → live tensors"):
        r = bench.ratio(res, ours, "seed")
        bench.target(res, f"{ours} vs seed ≥ 5x", r, 5, True)
        if bench.mecha:
            r = bench.ratio(res, ours, "sd-mecha")
            bench.target(res, f"{ours} vs sd-mecha ≥ 15x", r, 15, True)
    for lab in ("ours → new dict", "ours → live tensors", "sd-mecha"):
        if lab in res.rows:
            bench.check(res, lab, "seed")
    res.notes.append("Weights (BASE first): " + W26_TEXT + ". sd-mecha gets the same per-key weights through the "
                     "seed's block mapping (bench/mecha_ref.py, mapping='seed').")
    res.notes.append("'ours → new dict' is the like-for-like comparison and what the WebUI tab does today: the "
                     "service merges into a new dict and the host loads it with load_state_dict, as the seed "
                     "loads its dict (that load is outside the clock for everyone). 'ours → live tensors' merges "
                     "into a dict of A's tensors loaded before the clock starts (TensorSink): what the engine "
                     "can do for a host that accepts writes into the model's own tensors; the A1111 host does "
                     "not use it yet, because load_state_dict is where the Lora extension resets its backups.")

def ws_save(bench, res):
    spec = bench.base_spec(weights=W26_TEXT, mecha_op="weight_sum")
    bench.warm_hashes([spec["a"], spec["b"]])
    cs = [bench.contender(res.name, "ours CLI (process)", "ours", "ours_cli", spec, out=True),
          bench.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, out=True),
          bench.contender(res.name, "seed merge + save", "seed", "seed_save", spec, out=True)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                 out=True))
    bench.run_task(res, cs)
    rep = [m.data["cli_reported"] for m in res.rows["ours CLI (process)"]["measures"] if "cli_reported" in m.data]
    if rep:
        res.notes.append(f"The CLI's own report of its merge time (inside the process): median "
                         f"{statistics.median(rep):.2f} s.")
    for ours in ("ours CLI (process)", "ours merge_to_file"):
        r = bench.ratio(res, ours, "seed merge + save")
        bench.target(res, f"{ours} vs seed ≥ 3x", r, 3, True)
        if bench.mecha:
            r = bench.ratio(res, ours, "sd-mecha streamed")
            bench.target(res, f"{ours} vs sd-mecha > 1x", r, 1.0, True)
    for lab in ("ours CLI (process)", "ours merge_to_file", "sd-mecha streamed"):
        if lab in res.rows:
            bench.check(res, lab, "seed merge + save")
    bench.save_notes(res)
    res.notes.append("The CLI row is the whole process seen from outside (interpreter start and imports, about "
                     "1.5 s here, included); every other row is timed inside its process after the imports.")
