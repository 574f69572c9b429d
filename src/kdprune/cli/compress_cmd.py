"""`kdprune compress`: prune a trained run or saved model with a recipe, fine-tune, report, save."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdprune.cli.common import add_data_args, add_train_args, merge_train_flags, prepare_out
from kdprune.cli.user_model import add_model_args, load_cli_model
from kdprune.cli.recipe_flags import (RUN_WIDE, add_recipe_args, apply_recipe_flags, defaults_epilog, methods,
                                     recipe_fields)
from kdprune.training.config_io import from_dict, load_yaml, merge_tagged, to_tagged_dict

__all__ = ["add_parser", "build_recipe", "methods", "run"]


def add_parser(sub) -> None:
    """Register the `compress` sub-command."""
    p = sub.add_parser("compress", help="prune + distil a trained model to a FLOPs/params/latency target",
                       description="Compress a model from `kdprune train` (or a saved model folder). The "
                                   "training flags set the fine-tuning stage. Writes report.json/.md, the "
                                   "pruned model and one folder per training stage (config.json, "
                                   "metrics.jsonl, checkpoint.pt) into --out; --resume continues.",
                       epilog=defaults_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(methods()), help="recipe (default l1)")
    p.add_argument("--from", dest="source",
                   help="run directory, saved model folder, or pretrained:NAME "
                        "(a shipped base: `kdprune info --list`); or --factory + --weights")
    add_model_args(p)
    p.add_argument("--config", help="YAML: {method: NAME, recipe: {fields of the recipe}}; merged field by "
                                    "field over the method's own defaults")
    add_recipe_args(p)
    add_data_args(p, val_split=True)
    add_train_args(p, per_method=True)
    p.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    p.add_argument("--control", type=int, metavar="EPOCHS",
                   help="also fine-tune the dense model EPOCHS epochs (the fine-tune's settings) and report it: "
                        "the dense + same-epochs control row")
    p.add_argument("--out", required=True, help="output directory (new or empty, or the same run with --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compression in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the kdprune run already in --out")
    p.set_defaults(func=run)


def _run_wide(data: dict[str, Any], stages: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The run-wide training flags (budget, seed, device, progress...) in every stage."""
    given = {k: getattr(args, k) for k in RUN_WIDE if getattr(args, k, None) is not None}
    return {**data, **{s: {**data[s], **given} for s in stages}}


def build_recipe(args: argparse.Namespace) -> Any:
    """The method's own defaults, then the YAML recipe (merged field by field), then the flags."""
    cfg = load_yaml(args.config) if args.config else {}
    name = args.method or cfg.get("method", "l1")
    if name not in methods():
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(methods()))}")
    cls = methods()[name]
    where = str(args.config or "flags")
    recipe_yaml = cfg.get("recipe", {})
    if not isinstance(recipe_yaml, dict):
        raise ValueError(f"{where}: recipe must be a mapping of {cls.__name__} fields")
    data = merge_tagged(to_tagged_dict(cls()), recipe_yaml)
    data = apply_recipe_flags(cls, name, data, args)
    data["finetune"] = merge_train_flags(data["finetune"], args)
    data = _run_wide(data, recipe_fields(cls)[1], args)
    return from_dict(cls, data, where=where + ":recipe")


def run(args: argparse.Namespace) -> int:
    """Load the model and data, compress, print the table."""
    import kdprune as kp
    from kdprune.cli.common import load_source_data
    from kdprune.training import resolve_device
    from kdprune.utils.dist import is_main_process
    from kdprune.utils.meta import write_json

    recipe = build_recipe(args)
    recipe.target()  # validate before any loading
    resolve_device(recipe.finetune.device)
    out = Path(args.out)
    model, factory, src = load_cli_model(args.source, args)
    prepare_out(out, "compress", args.resume, args.overwrite, source=src)
    data, train, val, test = load_source_data(src, args, seed=recipe.finetune.seed)
    res = kp.compress(model, recipe, train, val, out_dir=out, resume=args.resume,
                      progress=recipe.finetune.progress, latency=not args.no_latency,
                      control_epochs=args.control, test=test, factory=factory)
    if is_main_process():  # so `kdprune eval OUT` finds the same data
        write_json(out / "config.json", {"run": data, "source": str(src), "recipe": res.report["recipe"]})
    print(res.markdown())
    return 0
