"""The contenders' side of a measurement: what runs inside the measured process for each op (ours into a new dict,
into live tensors, to a file, through the CLI; the seed's algorithm; sd-mecha). Each op returns its wall and CPU
time around the merge itself, after the imports, and saves the check keys after the clock stops."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time


def check_keys_save(state: dict, keys: list[str], path: str | None) -> None:
    """Save copies of `keys` of a result (after the timed part) for the correctness comparison."""
    if not path:
        return
    from safetensors.torch import save_file

    out = {k: state[k].detach().to("cpu").contiguous().clone() for k in keys if k in state}
    save_file(out, path)


def recipe(spec):
    from lib_merge.core.recipe import Recipe

    return Recipe(
        model_a=spec["a"], model_b=spec.get("b", ""), model_c=spec.get("c", ""), mode=spec.get("mode", "Weight sum"),
        calc=spec.get("calc", "normal"), alpha=spec.get("alpha", 0.5), beta=spec.get("beta", 0.25),
        weights_alpha=spec.get("weights", "") or "",
    )


@contextlib.contextmanager
def open_models(spec):
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


def preload_live(path):
    """The "loaded model": A's tensors in ordinary (already touched) memory, as the WebUI holds them."""
    from lib_merge.io.checkpoint import open_checkpoint

    with open_checkpoint(path) as a:
        return {k: a.get(k) for k in a.keys()}


def import_ours():
    """Import everything the timed part uses, so that no import lands inside the clock."""
    import lib_merge.core.engine  # noqa: F401
    import lib_merge.core.recipe  # noqa: F401
    import lib_merge.io.checkpoint  # noqa: F401


def op_ours_dict(spec):
    from lib_merge.core.engine import DictSink, plan_merge, run_merge

    import_ours()

    t0, c0 = time.perf_counter(), time.process_time()
    with open_models(spec) as models:
        plan = _restrict(plan_merge(recipe(spec), models), spec.get("subset"))
        kw = {"device": spec["device"]} if spec.get("device") else {}
        state = run_merge(plan, models, DictSink(), threads=spec.get("threads"), **kw)
        if spec.get("device"):
            import torch

            torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu, "merged": plan.merged}


def op_ours_live(spec):
    from lib_merge.core.engine import TensorSink, plan_merge, run_merge

    import_ours()
    live = preload_live(spec["a"])
    t0, c0 = time.perf_counter(), time.process_time()
    with open_models(spec) as models:
        plan = plan_merge(recipe(spec), models)
        sink = TensorSink(live)
        run_merge(plan, models, sink, threads=spec.get("threads"))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    check_keys_save(live, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu, "extra_keys": len(sink.extra)}


def op_ours_file(spec):
    from lib_merge.io.checkpoint import SaveOptions
    from lib_merge.io.hashes import HashCache
    from lib_merge.service.pipeline import merge_to_file

    import_ours()
    t0, c0 = time.perf_counter(), time.process_time()
    merge_to_file(recipe(spec), spec["out"], SaveOptions(), overwrite=True, metadata=True,
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
    check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
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
    check_keys_save(state, spec.get("check_keys", []), spec.get("check_path"))
    return {"time": dt, "cpu": cpu}


def op_mecha_save(spec):
    import mecha_ref  # noqa: F401

    if os.path.exists(spec["out"]):
        os.remove(spec["out"])
    t0, c0 = time.perf_counter(), time.process_time()
    _mecha_call(spec, spec["out"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"time": dt, "cpu": cpu, "fsync_after": _fsync_time(spec["out"])}
