"""`python -m lib_merge lora bake|merge|extract|diff|inspect`: the LoRA tools from the command line.

Same contract as `merge`: a bad input is one line on stderr, exit status 2, and nothing is written.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..lora.combine import METADATA_MODES


def add_lora_parser(sub, data_dir: Path) -> None:
    lora = sub.add_parser("lora", help="LoRA tools: bake into a checkpoint, merge LoRAs, extract, inspect")
    tools = lora.add_subparsers(dest="lora_command", required=True, parser_class=type(lora))
    spec_help = "file:ratio[:block weights] (a preset name or 12/17/20/26 values); repeat for more LoRAs"

    def common(p, dtype_default: str, dtypes: tuple[str, ...]) -> None:
        p.add_argument("--output", required=True, help="output .safetensors")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
        p.add_argument("--save-dtype", default=dtype_default, choices=dtypes)
        p.add_argument("--history", default=None, metavar="FILE",
                       help=f"merge log CSV (default {data_dir / 'mergehistory.csv'})")
        p.add_argument("--no-history", action="store_true", help="do not log this operation")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's); 1 is fastest on a busy machine")

    bake = tools.add_parser("bake", help="add LoRAs to a checkpoint's weights: W + sum ratio*dW")
    bake.add_argument("--model", required=True, help="checkpoint (.safetensors or .ckpt)")
    bake.add_argument("--lora", action="append", required=True, metavar="SPEC", help=spec_help)
    bake.add_argument("--presets", default=None, metavar="FILE", help="your LoRA Block Weight preset file")
    bake.add_argument("--no-metadata", action="store_true", help="write no recipe metadata (skips hashing)")
    common(bake, "keep", ("keep", "fp16", "bf16", "fp32"))

    merge = tools.add_parser("merge", help="merge LoRAs into one LoRA")
    merge.add_argument("--lora", action="append", required=True, metavar="SPEC", help=spec_help)
    merge.add_argument("--rank", default="concat", help="concat (exact, ranks add up; default), a rank N, or auto")
    merge.add_argument("--energy", type=float, default=0.99, help="fraction of |dW|^2 kept by --rank auto")
    merge.add_argument("--presets", default=None, metavar="FILE", help="your LoRA Block Weight preset file")
    merge.add_argument("--metadata", default="new", choices=METADATA_MODES,
                       help="output metadata, as the seed's options")
    common(merge, "fp16", ("fp16", "bf16", "fp32"))

    extract = tools.add_parser("extract", help="extract a LoRA of alpha*A - beta*B from two checkpoints")
    extract.add_argument("--model-a", required=True, help="the tuned model")
    extract.add_argument("--model-b", required=True, help="the base model")
    extract.add_argument("--alpha", type=float, default=1.0)
    extract.add_argument("--beta", type=float, default=1.0)
    extract.add_argument("--rank", default="128", help="rank of the Linear/1x1 layers: N (default 128) or auto")
    extract.add_argument("--conv-rank", default=None, help="also extract 3x3 convs at this rank (N or auto)")
    extract.add_argument("--energy", type=float, default=0.99, help="fraction of |dW|^2 kept by rank auto")
    extract.add_argument("--svd", default="full", choices=("full", "lowrank"),
                         help="full: the exact truncated SVD (default); lowrank: torch's randomised SVD")
    extract.add_argument("--clamp", type=float, default=0.99,
                         help="clamp factors to this quantile, as the seed (kohya) does; 1 keeps them exact")
    common(extract, "fp16", ("fp16", "bf16", "fp32"))

    diff = tools.add_parser("diff", help="extract from two LoRAs: the features of C like or unlike those of B "
                                         "(SuperMerger's 'Extract from two LoRAs')")
    diff.add_argument("--lora", action="append", required=True, metavar="SPEC",
                      help="file:ratio[:block weights], twice: B first, then C")
    diff.add_argument("--alpha", type=float, default=1.0, help="0: B's factors, 1: C's (default 1)")
    diff.add_argument("--beta", type=float, default=1.0, help="0: keep similar rows, 1: dissimilar ones (default 1)")
    diff.add_argument("--gamma", type=float, default=1.0, help="selectivity, >= 0 (default 1; 0: no selection)")
    diff.add_argument("--presets", default=None, metavar="FILE", help="your LoRA Block Weight preset file")
    diff.add_argument("--metadata", default="new", choices=METADATA_MODES,
                      help="output metadata, as the seed's options")
    common(diff, "keep", ("keep", "fp16", "bf16", "fp32"))

    inspect = tools.add_parser("inspect", help="describe a LoRA: type, family, ranks, alpha, metadata")
    inspect.add_argument("file")


def _history(args, data_dir: Path):
    from ..io.history import History

    return None if args.no_history else History(args.history or data_dir / "mergehistory.csv")


def cmd_lora(args, data_dir: Path, progress_bar) -> int:
    from ..lora import blocks

    if args.lora_command == "inspect":
        from ..lora.inspect import describe_lora

        print(describe_lora(Path(args.file)))
        return 0
    specs = [blocks.parse_spec(s) for s in getattr(args, "lora", None) or []]
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    update, close = progress_bar(f"LoRA {args.lora_command}", args.quiet)
    start = time.perf_counter()
    try:
        message = RUNNERS[args.lora_command](args, specs, data_dir, update)
    finally:
        close()
    print(f"{message} ({time.perf_counter() - start:.1f} s)")
    return 0


def _logged(history_id: int | None) -> str:
    return f", logged as merge {history_id}" if history_id is not None else ""


def _saved_lora(result) -> str:
    ranks = f"{result.ranks[0]}" if len(result.ranks) == 1 else f"{result.ranks[0]}-{result.ranks[-1]}"
    return (f"Saved {result.path} ({result.modules} modules, rank {ranks}, for "
            f"{result.family.upper()}{_logged(result.history_id)})")


def _bake(args, specs, data_dir: Path, update) -> str:
    from ..io.checkpoint import SaveOptions
    from ..io.hashes import HashCache
    from ..lora.bake import bake_to_file
    from ..lora.blocks import load_presets

    result = bake_to_file(args.model, specs, args.output, SaveOptions(dtype=args.save_dtype),
                          overwrite=args.overwrite, presets=load_presets(args.presets),
                          hashes=HashCache(data_dir / "hashes.json"), history=_history(args, data_dir),
                          metadata=not args.no_metadata, progress=update)
    for use in result.plan.uses:
        print(use.summary())
    changed = len(result.plan.changes)
    return (f"Saved {result.path} ({result.plan.arch.describe()}, {changed} tensors changed"
            f"{_logged(result.history_id)})")


def _merge(args, specs, data_dir: Path, update) -> str:
    from ..lora.blocks import load_presets
    from ..lora.combine import combine_to_file
    from ..lora.lowrank import RankChoice

    rank = None if args.rank.strip().lower() == "concat" else RankChoice.parse(args.rank, args.energy)
    result = combine_to_file(specs, args.output, rank, presets=load_presets(args.presets), dtype=args.save_dtype,
                             metadata=args.metadata, overwrite=args.overwrite, history=_history(args, data_dir),
                             progress=update)
    for name, names in result.unmatched.items():
        print(f"{name}: {len(names)} modules of unknown names left out: {', '.join(names[:8])}")
    return _saved_lora(result)


def _extract(args, specs, data_dir: Path, update) -> str:
    from ..lora.extract import extract_to_file
    from ..lora.lowrank import RankChoice

    conv = RankChoice.parse(args.conv_rank, args.energy) if args.conv_rank else None
    result = extract_to_file(args.model_a, args.model_b, args.output, alpha=args.alpha, beta=args.beta,
                             rank=RankChoice.parse(args.rank, args.energy), conv_rank=conv, method=args.svd,
                             clamp=args.clamp, dtype=args.save_dtype,
                             overwrite=args.overwrite, history=_history(args, data_dir), progress=update)
    te = "with the text encoder" if result.text_encoder else "U-Net only (the text encoders did not change)"
    return f"Saved {result.path} ({result.modules} modules, {te}{_logged(result.history_id)})"


def _diff(args, specs, data_dir: Path, update) -> str:
    from ..lora.blocks import load_presets
    from ..lora.difference import difference_to_file

    result = difference_to_file(specs, args.output, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                                presets=load_presets(args.presets), dtype=args.save_dtype, metadata=args.metadata,
                                overwrite=args.overwrite, history=_history(args, data_dir), progress=update)
    return _saved_lora(result)


RUNNERS = {"bake": _bake, "merge": _merge, "extract": _extract, "diff": _diff}
