"""Command line: `merge`, `inspect`, `analyze`, `lora`, `demo` and `ui`.

Errors are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from ..core.errors import MergeCancelled, MergeError
from ..core.kernels import CALC_MODES, MERGE_MODES
from ..core.methods import METHODS
from ..io.save_options import SAVE_DTYPES

EXIT_ERROR = 2


def default_data_dir() -> Path:
    """Where the CLI keeps its merge history and hash cache unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "block-merger"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we keep to one line
        raise MergeError(f"{message} (see `{self.prog} --help`)")  # prog is the whole command line


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_merge", description="Block Merger: merge Stable Diffusion checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    merge = sub.add_parser("merge", help="merge checkpoints into a file: a merge mode over models A, B, C, or a "
                                         "merge method over a base and N models")
    merge.add_argument("--model-a", default="", help="model A (.safetensors or .ckpt)")
    merge.add_argument("--model-b", default="", help="model B")
    merge.add_argument("--model-c", default="", help="model C (Add difference, Triple sum, sum Twice)")
    merge.add_argument("--mode", default="Weight sum", help=f"merge mode: {', '.join(MERGE_MODES)}")
    merge.add_argument("--calc", default="normal", help=f"calc mode: {', '.join(CALC_MODES)}")
    merge.add_argument("--method", default="", help=f"merge method instead of a mode: {', '.join(METHODS)}")
    merge.add_argument("--base", default="", help="the method's base model")
    merge.add_argument("--model", action="append", default=[], metavar="FILE",
                       help="a model for the method (repeat for each)")
    merge.add_argument("--model-weights", default="", metavar="W1,W2",
                       help="per-model weights of the method's task vectors (default 1 each)")
    merge.add_argument("--alpha", type=float, default=None,
                       help="alpha (default 0.5); for a method its scale λ (default 1) or slerp's t (default 0.5)")
    merge.add_argument("--t", type=float, default=None, help="slerp's interpolation t (the same as --alpha)")
    merge.add_argument("--density", type=float, default=0.2, help="fraction kept (ties, della)")
    merge.add_argument("--drop", type=float, default=0.9, help="drop probability (dare, dare_ties)")
    merge.add_argument("--epsilon", type=float, default=0.1, help="della's spread of drop probabilities")
    merge.add_argument("--beta", type=float, default=0.25)
    merge.add_argument("--mbw", default="", metavar="W",
                       help="block weights for alpha: 26 (SD1/SD2), 20 (SDXL) or 61 (Flux: CLIP, T5, IN, D00-D18, "
                            "S00-S37, OUT) numbers, or a preset name; the first value (BASE; Flux: CLIP) replaces "
                            "--alpha")
    merge.add_argument("--mbw-beta", default="", metavar="W", help="block weights for beta")
    for name in ("density", "drop", "epsilon"):
        merge.add_argument(f"--mbw-{name}", default="", metavar="W", help=f"block weights for {name}")
    merge.add_argument("--elemental", default="", metavar="TEXT", help="Blocks:Elements:Ratio entries")
    for name in ("density", "drop", "epsilon"):
        merge.add_argument(f"--elemental-{name}", default="", metavar="TEXT",
                           help=f"Blocks:Elements:Value entries for {name}")
    merge.add_argument("--adjust", default="", metavar="NUMBERS",
                       help="8 numbers: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3")
    merge.add_argument("--inex", default="Off", choices=("Off", "Include", "Exclude"))
    merge.add_argument("--blocks", default="", help="blocks for --inex, e.g. IN01,OUT02,VAE")
    merge.add_argument("--elements", default="", help="key substrings for --inex, e.g. attn,norm")
    merge.add_argument("--gamma", type=float, default=0.3, help="extract's selectivity")
    merge.add_argument("--seed", type=int, default=-1, help="weight seed for R/U ratios and plus random")
    dice = merge.add_argument_group("random weights (the seed's \"Let the Dice roll\"; see README)")
    dice.add_argument("--random", default="", metavar="MODE",
                      help="draw the block weights from --seed: R, U, X, D, ER, EU, EX, or custom (--template)")
    dice.add_argument("--template", default="", help="custom: one token per block (numbers, R/U/X/D/ER/EU/EX)")
    dice.add_argument("--upper", default="1", help="X: upper limit; D: mid point (one value or one per block)")
    dice.add_argument("--lower", default="0", help="X: lower limit (xRp: x with probability p, else 0); D: range")
    dice.add_argument("--clamp-upper", default="", help="clamp every drawn weight to at most this")
    dice.add_argument("--clamp-lower", default="", help="clamp every drawn weight to at least this")
    dice.add_argument("--round", type=int, default=3, help="decimals of the drawn weights (default 3)")
    dice.add_argument("--random-targets", default="alpha", help="alpha, beta or alpha,beta")
    dice.add_argument("--extend-xl", action="store_true", help="SDXL: draw the 110 fine-block weights")
    merge.add_argument("--output", required=True, help="output .safetensors or .ckpt")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    merge.add_argument("--save-dtype", default="keep", choices=tuple(SAVE_DTYPES),
                       help="keep: model A's dtypes; fp8 output is allowed, with a warning about its precision")
    merge.add_argument("--prune", action="store_true", help="drop EMA weights and schedule buffers")
    merge.add_argument("--bake-vae", default=None, metavar="FILE", help="replace the VAE with this file's")
    merge.add_argument("--reset-clip-ids", action="store_true", help="write correct CLIP position ids")
    merge.add_argument("--copy-config", action="store_true",
                       help="copy model A's .yaml config beside the output (SD2 v, inpainting models need it)")
    merge.add_argument("--no-metadata", action="store_true", help="write no recipe metadata (skips hashing)")
    merge.add_argument("--history", default=None, metavar="FILE",
                       help=f"merge log CSV (default {default_data_dir() / 'mergehistory.csv'})")
    merge.add_argument("--no-history", action="store_true", help="do not log this merge")
    merge.add_argument("--threads", type=int, default=None, help="worker threads (default: 1; all cores for "
                                                                  "smoothAdd MT)")
    merge.add_argument("--device", default="cpu", help="compute device: cpu (default) or cuda")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--log-ratios", action="store_true",
                       help="print every key's block, alpha and beta to stderr before merging")

    inspect = sub.add_parser("inspect", help="describe a checkpoint: architecture, dtypes, blocks, metadata")
    inspect.add_argument("file")
    inspect.add_argument("--keys", action="store_true", help="list every key with its block, shape and dtype")
    inspect.add_argument("--filter", default="", metavar="TEXT", help="with --keys: only keys containing TEXT")

    analyze = sub.add_parser("analyze", help="how similar two or three models are, per block (and per key)")
    analyze.add_argument("models", nargs="+", metavar="MODEL", help="two or three checkpoints: A B [C]")
    analyze.add_argument("--per-key", action="store_true", help="also list every compared key")
    analyze.add_argument("--asimilarity", action="store_true",
                         help="also probe each U-Net transformer block's self-attention (the seed's ASimilarity)")
    analyze.add_argument("--csv", metavar="OUT", default=None, help="also save the table (blocks and keys) as CSV")
    analyze.add_argument("--overwrite", action="store_true", help="with --csv: replace an existing file")

    from .lora import add_lora_parser

    add_lora_parser(sub, default_data_dir())

    demo = sub.add_parser("demo", help="merge small synthetic models and show what changed, per block")
    demo.add_argument("--keep", metavar="DIR", default=None, help="write the demo models and merges here")
    demo.add_argument("--ui", action="store_true", help="then open the merge tab (standalone app) on the demo models")
    demo.add_argument("--port", type=int, default=None, help="port of the app with --ui")

    ui = sub.add_parser("ui", help="the merge tab as a standalone app on 127.0.0.1 (no WebUI needed)")
    ui.add_argument("--models", default=".", metavar="DIR", help="folder of checkpoints to merge (default: .)")
    ui.add_argument("--port", type=int, default=None, help="port (default 7870)")
    ui.add_argument("--data", default=None, metavar="DIR",
                    help=f"merge history and hash cache (default {default_data_dir()})")
    ui.add_argument("--browser", action="store_true", help="open a web browser on the app")
    return parser


def _recipe_from_args(args):
    from ..core.recipe import Recipe

    split = [t.strip() for t in args.blocks.replace(" ", ",").split(",") if t.strip()]
    elements = [t.strip() for t in args.elements.split(",") if t.strip()]
    common = dict(weights_alpha=args.mbw, elemental=args.elemental, adjust=args.adjust, inex=args.inex,
                  inex_blocks=tuple(split), inex_elements=tuple(elements), seed=args.seed)
    if not args.method:
        if args.base or args.model or args.t is not None:
            raise MergeError("--base, --model and --t go with --method; a merge mode takes --model-a/-b/-c.")
        if not args.model_a:
            raise MergeError("--model-a is required (or give --method with --base and --model).")
        return Recipe(
            model_a=args.model_a, model_b=args.model_b, model_c=args.model_c, mode=args.mode, calc=args.calc,
            alpha=0.5 if args.alpha is None else args.alpha, beta=args.beta, weights_beta=args.mbw_beta,
            gamma=args.gamma, **common,
        )
    if args.model_a or args.model_b or args.model_c or args.mode != "Weight sum" or args.mbw_beta:
        raise MergeError("--method takes --base and --model; --model-a/-b/-c, --mode and --mbw-beta belong to the "
                         "merge modes.")
    return Recipe(model_a=args.base, calc=args.calc,
                  method=args.method, models=tuple(args.model), model_weights=_model_weights(args.model_weights),
                  alpha=_method_alpha(args), density=args.density, drop=args.drop, epsilon=args.epsilon,
                  **{f"{kind}_{n}": getattr(args, f"{flag}_{n}") for kind, flag in (("weights", "mbw"),
                     ("elemental", "elemental")) for n in ("density", "drop", "epsilon")}, **common)


def _random_recipe(recipe, args):
    """With --random: the recipe with block weights drawn from --seed (one is drawn and printed for -1)."""
    if not args.random:
        return recipe
    import secrets

    from ..core.arch import detect_arch
    from ..core.random_weights import RandomSpec, apply
    from ..io.checkpoint import open_checkpoint

    spec = RandomSpec(args.random, args.template, args.upper, args.lower, args.clamp_upper, args.clamp_lower,
                      args.round, tuple(t.strip() for t in args.random_targets.split(",") if t.strip()),
                      args.extend_xl).check()
    seed = secrets.randbelow(2**32) if args.seed == -1 else args.seed
    with open_checkpoint(Path(recipe.model_a)) as ckpt:
        arch = detect_arch(set(ckpt.keys()), ckpt.shape, f"Model A ({recipe.model_a})")
    recipe = apply(recipe, spec, seed, arch)
    drawn = f"alpha {recipe.weights_alpha}" + (f"; beta {recipe.weights_beta}" if "beta" in spec.targets else "")
    print(f"Random weights (seed {seed}): {drawn}")
    return recipe


def _model_weights(text: str) -> tuple[float, ...]:
    from ..core.weights import parse_number

    return tuple(parse_number(t, "--model-weights") for t in text.split(",")) if text.strip() else ()


def _method_alpha(args) -> float:
    """--alpha, or slerp's --t (the same number), or the method's default."""
    if args.t is not None and args.method != "slerp":
        raise MergeError(f"--t is slerp's interpolation; {args.method} takes --alpha (its scale λ).")
    if args.t is not None and args.alpha is not None and args.t != args.alpha:
        raise MergeError(f"--t {args.t} and --alpha {args.alpha} disagree; slerp's t is one number, give one.")
    given = args.t if args.t is not None else args.alpha
    if given is not None:
        return given
    method = METHODS.get(args.method)
    return method.default_alpha if method else 1.0


def progress_bar(desc: str, quiet: bool = False):
    """A tqdm bar driven by the engine's (done, total) callback, opened on the first report; returns (callback,
    close), so a merge refused before it starts prints nothing but its error."""
    from tqdm import tqdm

    bars = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit="key", disable=quiet, leave=False, file=sys.stderr))
        bar = bars[0]
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def cmd_merge(args) -> int:
    from ..io.checkpoint import SaveOptions
    from ..io.hashes import HashCache
    from ..io.history import History
    from ..service.pipeline import merge_to_file

    recipe = _random_recipe(_recipe_from_args(args), args)
    options = SaveOptions(dtype=args.save_dtype, prune=args.prune, bake_vae=args.bake_vae,
                          reset_clip_ids=args.reset_clip_ids, copy_config=args.copy_config)
    data = default_data_dir()
    history = None if args.no_history else History(args.history or data / "mergehistory.csv")
    update, close = progress_bar("merging", args.quiet)
    start = time.perf_counter()
    try:
        result = merge_to_file(recipe, args.output, options, overwrite=args.overwrite,
                               hashes=HashCache(data / "hashes.json"), history=history,
                               metadata=not args.no_metadata, progress=update, threads=args.threads,
                               device=args.device, log_ratios=args.log_ratios)
    finally:
        close()
    plan = result.plan
    logged = f", logged as merge {result.history_id}" if result.history_id is not None else ""
    print(f"Saved {result.path} ({plan.arch.describe()}, {plan.merged} of {len(plan.jobs)} tensors merged, "
          f"{time.perf_counter() - start:.1f} s{logged})")
    print(f"Recipe: {plan.recipe.title()}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.reset_clip_ids:
        print(clip_ids_report(Path(plan.recipe.model_a)))
    return 0


def clip_ids_report(model_a: Path) -> str:
    """What "Reset CLIP ids" fixed: the output's position ids come from model A, so A's are the ones checked."""
    from ..io.checkpoint import CLIP_POSITION_ID_KEYS, clip_id_problems, open_checkpoint

    with open_checkpoint(model_a) as ckpt:
        keys = [k for k in CLIP_POSITION_ID_KEYS if k in ckpt]
        wrong = [i for k in keys for i in clip_id_problems(ckpt.get(k))]
    if not keys:
        return "Reset CLIP ids: model A has no CLIP position ids."
    return f"Reset CLIP ids: fixed positions {wrong}." if wrong else "Reset CLIP ids: they were already correct."


def cmd_inspect(args) -> int:
    if args.keys:
        from ..analysis.elements import format_elements, list_elements

        print(format_elements(list_elements(Path(args.file), args.filter)))
        return 0
    if args.filter:
        raise MergeError("--filter lists keys: use it with --keys (see `python -m lib_merge inspect --help`)")
    from .inspect import describe

    print(describe(Path(args.file)))
    return 0


def cmd_analyze(args) -> int:
    from ..analysis.similarity import compare_models, format_comparison
    from ..io.checkpoint import check_output_path

    if len(args.models) not in (2, 3):
        raise MergeError(f"analyze takes two or three models, got {len(args.models)} "
                         "(see `python -m lib_merge analyze --help`)")
    if args.overwrite and not args.csv:
        raise MergeError("--overwrite replaces the --csv file: use it with --csv OUT "
                         "(see `python -m lib_merge analyze --help`)")
    if args.csv:
        check_output_path(args.csv, args.models, args.overwrite)  # before the analysis, not after minutes of it
    result = compare_models([Path(m) for m in args.models], attention=args.asimilarity)
    print(format_comparison(result, per_key=args.per_key))
    if args.csv:
        from ..analysis.table_csv import save_csv

        print(f"Saved the table to {save_csv(result, args.csv, args.overwrite)}")
    return 0


def cmd_demo(args) -> int:
    import tempfile

    from .demo import run_demo

    if not args.ui:
        run_demo(Path(args.keep) if args.keep else None)
        return 0
    with tempfile.TemporaryDirectory(prefix="block-merger-demo-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        run_demo(folder)
        print(f"\nOpening the merge tab on {folder}" + ("" if args.keep else " (removed when the app stops)"))
        return _serve(folder, args.port, folder, False)


def _serve(models: Path, port: int | None, data: Path, browser: bool) -> int:
    from ..ui.app import DEFAULT_PORT, HOST, serve

    port = port or DEFAULT_PORT
    print(f"Block Merger on http://{HOST}:{port} (Ctrl+C stops it)")
    serve(models, port, data, block=True, open_browser=browser)
    return 0


def cmd_ui(args) -> int:
    return _serve(Path(args.models), args.port, Path(args.data) if args.data else default_data_dir(), args.browser)


def cmd_lora(args) -> int:
    from .lora import cmd_lora as run

    return run(args, default_data_dir(), progress_bar)


COMMANDS = {"merge": cmd_merge, "inspect": cmd_inspect, "analyze": cmd_analyze, "lora": cmd_lora, "demo": cmd_demo,
            "ui": cmd_ui}
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl+C so that every clean-up (the output's temporary file) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """While a command runs, SIGTERM and SIGHUP (a closed terminal, `kill`, a service manager) stop it as Ctrl+C
    does, instead of ending the process with the output's temporary file left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _terminate) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not inside it


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning, as errors are
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        with _stop_signals_interrupt():
            args = build_parser().parse_args(argv)
            return COMMANDS[args.command](args)
    except MergeCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated as e:
        print(f"cancelled: stopped by {signal.Signals(e.signum).name}; no output was written.", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("cancelled: interrupted; no output was written.", file=sys.stderr)
        return 130
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return EXIT_ERROR
