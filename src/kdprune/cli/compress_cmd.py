"""`kdprune compress`: prune a trained run or saved model with a recipe, fine-tune, report, save."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdprune.cli.common import add_data_args, add_train_args, merge_train_flags
from kdprune.training.config_io import from_dict, load_yaml, to_tagged_dict


def methods() -> dict[str, type]:
    """CLI method names -> recipe types."""
    from kdprune import recipes

    return {"l1": recipes.L1Finetune, "groupnorm": recipes.GroupNorm, "kd": recipes.KDFinetune,
            "kesi": recipes.KESI, "pfec": recipes.KESIPFEC,
            "sdap": recipes.SDAP}


def add_parser(sub) -> None:
    """Register the `compress` sub-command."""
    p = sub.add_parser("compress", help="prune + distil a trained model to a FLOPs/params target",
                       description="Compress a model from `kdprune train` (or a saved model folder). The "
                                   "training flags set the fine-tuning run. Writes report.json/.md, the "
                                   "pruned model and stage checkpoints into --out; --resume continues.")
    p.add_argument("--method", choices=sorted(methods()), help="recipe (default l1)")
    p.add_argument("--from", dest="source", required=True, help="run directory or saved model folder")
    p.add_argument("--config", help="YAML: {method: NAME, recipe: {fields of the recipe}}")
    g = p.add_argument_group("pruning")
    g.add_argument("--target-flops", type=float, help="fraction of FLOPs to keep, in (0, 1)")
    g.add_argument("--target-params", type=float, help="fraction of params to keep, in (0, 1)")
    g.add_argument("--min-width", type=int, help="never keep fewer channels per group (default 1)")
    g.add_argument("--round-to", type=int, help="round kept widths to a multiple of this (4, 8, 16)")
    g.add_argument("--temperature", type=float, help="KD temperature (kd)")
    g.add_argument("--alpha", type=float, help="KD weight (kd)")
    g.add_argument("--reg", type=float, help="group-lasso strength (groupnorm)")
    g.add_argument("--sparse-epochs", type=int, help="sparse-training epochs (groupnorm)")
    add_data_args(p)
    add_train_args(p)
    p.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compression in --out")
    p.set_defaults(func=run)


_RECIPE_FLAGS = ("target_flops", "target_params", "min_width", "round_to", "temperature", "alpha", "reg")


def build_recipe(args: argparse.Namespace) -> Any:
    """YAML recipe first, flags on top; fine-tune defaults come from the recipe type."""
    cfg = load_yaml(args.config) if args.config else {}
    name = args.method or cfg.get("method", "l1")
    if name not in methods():
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(methods()))}")
    cls = methods()[name]
    data = {**to_tagged_dict(cls()), **cfg.get("recipe", {})}
    for key in _RECIPE_FLAGS:
        if getattr(args, key, None) is not None:
            if key not in data:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to method {name!r}")
            data[key] = getattr(args, key)
    data["finetune"] = merge_train_flags(data["finetune"], args)
    if args.sparse_epochs is not None and "sparse" in data:
        data["sparse"] = {**data["sparse"], "epochs": args.sparse_epochs}
    return from_dict(cls, data, where=str(args.config or "flags"))


def run(args: argparse.Namespace) -> int:
    """Load the model and data, compress, print the table."""
    import kdprune as kp
    from kdprune.cli.common import load_source_data, model_dir
    from kdprune.utils.dist import is_main_process
    from kdprune.utils.meta import write_json

    recipe = build_recipe(args)
    recipe.target()  # validate before any loading
    src = Path(args.source)
    model = kp.load_pruned(model_dir(src))
    data, train, val = load_source_data(src, args, seed=recipe.finetune.seed)
    res = kp.compress(model, recipe, train, val, out_dir=args.out, resume=args.resume,
                      progress=recipe.finetune.progress, latency=not args.no_latency)
    if is_main_process():  # so `kdprune eval OUT` finds the same data
        write_json(Path(args.out) / "config.json", {"run": data, "source": str(src),
                                                    "recipe": res.report["recipe"]})
    print(res.markdown())
    return 0
