"""Add difference (A + α(B − C)): in memory and merged and saved; its exact-formula checks (also used by SDXL)."""

from __future__ import annotations

from checks import formula_add_difference

ALPHA_ADD = 0.5


def adddiff_mem(bench, res):
    p = bench.models("sd1")
    spec = bench.base_spec(c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
    cs = [bench.contender(res.name, "ours → new dict", "ours", "ours_dict", spec),
          bench.contender(res.name, "seed", "seed", "seed_mem", spec)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha", "mecha", "mecha_mem", spec))
    bench.cuda_contender(res, cs, spec)
    bench.run_task(res, cs)
    r = bench.ratio(res, "ours → new dict", "seed")
    bench.target(res, "ours vs seed ≥ 5x", r, 5, True)
    if bench.mecha:
        bench.ratio(res, "ours → new dict", "sd-mecha")
    adddiff_checks(bench, res, spec, "ours → new dict", "seed", "sd-mecha")

def adddiff_checks(bench, res, spec, ours, seed, mecha):
    exact = formula_add_difference({"A": spec["a"], "B": spec["b"], "C": spec["c"]}, spec["check_keys"],
                                   spec["alpha"])
    for lab in (ours, mecha, seed):
        if lab and lab in res.rows:
            bench.check(res, lab, "", f"{lab} vs exact A + α(B − C) (float64)", ref=exact)
    if seed:
        for lab in (ours, mecha):
            if lab in res.rows:
                bench.check(res, lab, seed)
    res.notes.append("Ours (and sd-mecha) compute A + α(B − C) in fp32 and round once; the seed rounds B − C to "
                     "fp16 first (Stage 0) and then adds in fp16, so it differs by up to 2 fp16 ulps and is the "
                     "one further from the exact value.")

def adddiff_save(bench, res):
    p = bench.models("sd1")
    spec = bench.base_spec(c=p["C"], mode="Add difference", alpha=ALPHA_ADD, mecha_op="add_difference")
    bench.warm_hashes([spec["a"], spec["b"], spec["c"]])
    cs = [bench.contender(res.name, "ours merge_to_file", "ours", "ours_file", spec, out=True),
          bench.contender(res.name, "seed merge + save", "seed", "seed_save", spec, out=True)]
    bench.mecha_or_note(res, cs, bench.contender(res.name, "sd-mecha streamed", "mecha", "mecha_save", spec,
                                                 out=True))
    bench.run_task(res, cs)
    r = bench.ratio(res, "ours merge_to_file", "seed merge + save")
    bench.target(res, "ours vs seed ≥ 5x (Add difference target, here with the save)", r, 5, True)
    if bench.mecha:
        bench.ratio(res, "ours merge_to_file", "sd-mecha streamed")
    adddiff_checks(bench, res, spec, "ours merge_to_file", "seed merge + save", "sd-mecha streamed")
    bench.save_notes(res)
