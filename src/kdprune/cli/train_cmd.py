"""`kdprune train`: train a zoo model on a data set, resumable, DDP under torchrun."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdprune.cli.common import (RunConfig, add_data_args, add_train_args, build_run_config, parse_kv, prepare_out,
                                split_and_subset)
from kdprune.training.config_io import to_tagged_dict


def add_parser(sub) -> None:
    """Register the `train` sub-command."""
    p = sub.add_parser("train", help="train a model on a data set",
                       description="Train a zoo model. YAML (--config) fills the same options as the "
                                   "flags; flags win. Writes config.json, metrics.jsonl, checkpoint.pt "
                                   "and the final model (safetensors + structure.json) into --out. "
                                   "Run under `torchrun --nproc-per-node N` for data-parallel training.")
    p.add_argument("--config", help="YAML file with RunConfig fields (model, data, train: {...})")
    p.add_argument("--model", help="zoo model name (default resnet20); see `kdprune info --list`")
    p.add_argument("--model-kwargs", nargs="*", type=str, metavar="KEY=VALUE", action="extend",
                   help="extra model arguments, e.g. shortcut=B")
    add_data_args(p, val_split=True)
    add_train_args(p)
    p.add_argument("--out", required=True, help="run directory (new or empty, or the same run with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the kdprune run already in --out")
    p.set_defaults(func=run)


def load_run_data(cfg: RunConfig):
    """(train, val, test) for a RunConfig, subset if asked: with ``val_split`` the validation set is
    carved from the training images and the test split is returned apart (None otherwise)."""
    import kdprune as kp

    kwargs = {"root": cfg.data_root} if cfg.data_root else {}
    return split_and_subset(kp.data.load(cfg.data, **kwargs), cfg.val_split, cfg.train_subset, cfg.val_subset,
                            cfg.train.seed)


def run(args: argparse.Namespace) -> int:
    """Build the config, the model and the data, then train."""
    import kdprune as kp
    from kdprune.training import resolve_device
    from kdprune.utils.dist import is_main_process

    from kdprune.utils.seed import seed_everything

    args.model_kwargs = parse_kv(args.model_kwargs)
    cfg = build_run_config(args)
    resolve_device(cfg.train.device)  # before any loading or writing
    train, val, test = load_run_data(cfg)
    prepare_out(Path(args.out), "train", args.resume, args.overwrite)
    seed_everything(cfg.train.seed)  # before the model draws its init: --seed alone fixes the run
    model = kp.create_model(cfg.model, num_classes=train.num_classes, in_chans=train.in_chans, **cfg.model_kwargs)
    res = kp.train(model, train, val, cfg.train, out_dir=Path(args.out), resume=args.resume,
                   record={"run": to_tagged_dict(cfg)})
    if is_main_process():
        m = res.metrics
        print(f"done: {cfg.model} on {cfg.data}: val top1 {m.get('val_top1', float('nan')):.2f}%  "
              f"(loss {m.get('val_loss', float('nan')):.4f}) -> {args.out}")
        if test is not None:  # reported only: nothing above chose anything on it
            _report_test(res.model, test, cfg, Path(args.out))
    return 0


def _report_test(model, test, cfg: RunConfig, out: Path) -> None:
    """Score the final model once on the test split and write test_metrics.json."""
    from kdprune.training.evaluate import evaluate
    from kdprune.utils.meta import write_json

    m = evaluate(model, test, batch_size=cfg.train.eval_batch_size)
    write_json(out / "test_metrics.json", {"test_top1": m["top1"], "test_loss": m["loss"], "images": len(test),
                                          "val_split": cfg.val_split})
    print(f"test top1 {m['top1']:.2f}% on {len(test)} images (reported only)")
