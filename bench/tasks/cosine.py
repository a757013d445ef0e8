"""cosineA, in memory (sd-mecha's add_cosine_a is timed for reference only: another algorithm)."""

from __future__ import annotations

ALPHA_COS = 0.3


def cosineA(bench, res):
    spec = bench.base_spec(calc="cosineA", alpha=ALPHA_COS, mecha_op="cosine")
    cs = [bench.contender(res.name, "ours → new dict", "ours", "ours_dict", spec),
          bench.contender(res.name, "seed", "seed", "seed_mem", spec)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha add_cosine_a", "mecha", "mecha_mem", spec))
    bench.run_task(res, cs)
    bench.ratio(res, "ours → new dict", "seed")
    if bench.mecha:
        res.ratios.append(("ours → new dict", "sd-mecha add_cosine_a", None,
                           "not the same operation: no ratio"))
    bench.check(res, "ours → new dict", "seed")
    if bench.mecha:
        bench.check(res, "sd-mecha add_cosine_a", "seed",
                    "sd-mecha add_cosine_a vs seed (expected to differ: another algorithm)")
    res.notes.append("sd-mecha's add_cosine_a is a different algorithm (per-key clamp(sim − α), no model-wide "
                     "similarity range, no magnitude term, VAE merged): timed for reference only, no ratio. "
                     "The issue sets no numeric target for this task.")
