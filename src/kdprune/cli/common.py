"""Pieces shared by the CLI commands: the run config, flag groups, YAML + flag merging."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdprune.training.config_io import UNION_NAMES, from_dict, load_yaml
from kdprune.training.config import TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """What `kdprune train` runs: model + data + training config (YAML files fill this)."""

    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_root: str | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    # Training images held out (stratified, kdprune.data.SPLIT_SEED) as the validation set that every
    # per-epoch score uses; the data set's own test split is then only reported at the end.
    val_split: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


# flag dest -> (section, key): where an explicitly given flag lands in the config dict
_TRAIN_FLAGS = ("epochs", "batch_size", "eval_batch_size", "label_smoothing", "grad_clip", "bf16",
                "channels_last", "compile", "seed", "device", "threads", "max_steps_per_epoch",
                "eval_every", "augment", "progress", "weight_decay_1d")
_OPT_FLAGS = {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"}
_SCHED_FLAGS = {"warmup_epochs": "warmup_epochs", "min_lr": "min_lr", "max_lr": "max_lr"}


def add_data_args(p: argparse.ArgumentParser, val_split: bool = False) -> None:
    """--data, --data-root, subsets (and --val-split where the command honours it)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="data set name: fashion-mnist (default), mnist, cifar10, cifar100, imagefolder")
    g.add_argument("--data-root", help="folder holding the data set files (default: the set's standard path)")
    g.add_argument("--train-subset", type=int, help="use only the first N (seeded) training images")
    g.add_argument("--val-subset", type=int, help="use only N (seeded) validation images")
    if val_split:
        g.add_argument("--val-split", type=int, metavar="N",
                       help="hold out N training images (stratified, always the same ones) as the validation "
                            "set for every choice and per-epoch score; the test split is only reported")


def add_train_args(p: argparse.ArgumentParser, per_method: bool = False) -> None:
    """Every TrainConfig field as a flag (defaults live in the dataclass, not here).

    ``per_method``: the flags configure a recipe's fine-tune stage, whose defaults differ per
    method, so the help names no generic default (the compress help lists the real ones)."""
    d = TrainConfig()

    def h(text: str, default: object = None) -> str:
        if per_method:
            return text + (" (default: the method's, see below)" if default is not None else "")
        return text + (f" (default {default})" if default is not None else "")

    stage = " (the fine-tune stage; run-wide flags reach every stage)" if per_method else ""
    g = p.add_argument_group("training" + stage)
    g.add_argument("--epochs", type=int, help=h("number of epochs", d.epochs))
    g.add_argument("--batch-size", type=int, help=h("global batch size, split over torchrun ranks", d.batch_size))
    g.add_argument("--eval-batch-size", type=int, help=f"evaluation batch size (default {d.eval_batch_size})")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help=h("optimizer", "sgd"))
    g.add_argument("--lr", type=float, help=h("learning rate", "sgd 0.1, adam/adamw 1e-3"))
    g.add_argument("--momentum", type=float, help=h("SGD momentum", 0.9))
    g.add_argument("--weight-decay", type=float, help=h("weight decay", "sgd 5e-4, adamw 1e-2"))
    g.add_argument("--weight-decay-1d", action="store_const", const=True,
                   help="also decay BN affine, biases and gates (default: conv/linear weights only)")
    g.add_argument("--schedule", choices=["constant", "step", "cosine", "onecycle"],
                   help=h("LR schedule, stepped per batch", "cosine"))
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up (constant/step/cosine)")
    g.add_argument("--min-lr", type=float, help="final LR of the cosine schedule (default 0)")
    g.add_argument("--max-lr", type=float, help="peak LR of the one-cycle schedule (default: --lr)")
    g.add_argument("--label-smoothing", type=float, help=h("label smoothing for cross-entropy", 0))
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="turn off the data set's default augmentation")
    g.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast")
    g.add_argument("--channels-last", action="store_const", const=True, help="channels_last memory format")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--max-steps-per-epoch", type=int,
                   help="cap training steps and per-epoch evaluation batches per epoch (smoke runs)")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (default 1)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bars or per-epoch lines")


def merge_train_flags(base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Overlay the training flags the user gave on a TrainConfig dict from YAML."""
    out = dict(base)
    out.update({k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None})
    out["optimizer"] = _merge_union(out.get("optimizer"), getattr(args, "optimizer", None),
                                    {v: getattr(args, k, None) for k, v in _OPT_FLAGS.items()}, "sgd")
    out["schedule"] = _merge_union(out.get("schedule"), getattr(args, "schedule", None),
                                   {v: getattr(args, k, None) for k, v in _SCHED_FLAGS.items()}, "cosine")
    return out


def _merge_union(current: Any, name: str | None, values: dict[str, Any], default: str) -> dict[str, Any]:
    cur = {"type": current} if isinstance(current, str) else dict(current or {"type": default})
    if name is not None and name != cur.get("type"):
        cur = {"type": name}
    cur.update({k: v for k, v in values.items() if v is not None})
    fields = UNION_NAMES[cur["type"]].__dataclass_fields__
    bad = [k for k in cur if k != "type" and k not in fields]
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to {cur['type']!r}")
    return cur


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """YAML (--config) first, then explicit flags on top; defaults come from the dataclasses."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for key in ("model", "data", "data_root", "train_subset", "val_subset", "val_split"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if getattr(args, "model_kwargs", None):
        data["model_kwargs"] = {**data.get("model_kwargs", {}), **args.model_kwargs}
    data["train"] = merge_train_flags(data.get("train", {}), args)
    return from_dict(RunConfig, data, where=str(getattr(args, "config", None) or "flags"))


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """--model-kwargs shortcut=B width_mult=0.5 -> {"shortcut": "B", "width_mult": 0.5} (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model-kwargs expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ValueError(f"--model-kwargs {item!r}: cannot read the value {v!r}") from None
    return out


def source_path(text: str) -> Path:
    """The folder a --from / PATH argument names: ``pretrained:NAME`` is a shipped base (its
    weights checked against the manifest's sha256), anything else a path."""
    from kdprune.models.pretrained import PREFIX, pretrained_dir

    return pretrained_dir(text) if str(text).startswith(PREFIX) else Path(text)


def model_dir(path: Path) -> Path:
    """The saved-model folder inside a run directory (or `path` itself)."""
    for cand in (path, path / "model"):
        if (cand / "structure.json").is_file():
            return cand
    if (path / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{path} holds an unfinished run (checkpoint.pt, no model/ yet): finish it "
                                f"with `kdprune train --out {path} --resume` (same options) first")
    raise FileNotFoundError(f"{path} holds no saved model (structure.json); "
                            f"give a run directory from `kdprune train` or a `save_pruned` folder")


def run_data_name(path: Path) -> tuple[str | None, str | None]:
    """The data set (name, root) recorded in a run directory's config.json or a shipped base's
    manifest, if any."""
    from kdprune.models.pretrained import BASES

    if path.parent == BASES:
        from kdprune.models.pretrained import pretrained_info

        return pretrained_info(path.name)["data"], None
    cfg = path / "config.json"
    if not cfg.is_file():
        return None, None
    run = json.loads(cfg.read_text()).get("run", {})
    return run.get("data"), run.get("data_root")


def load_source_data(path: Path, args: argparse.Namespace, seed: int = 0) -> tuple[dict[str, Any], Any, Any, Any]:
    """(data record, train, val, test): --data/--data-root, else what the run at `path` recorded;
    subset if asked. With --val-split N the validation set is N training images held out (seeded)
    and the test split is returned apart (reported only); otherwise test is None and val is the
    set's own split."""
    import kdprune as kp

    rec_name, rec_root = run_data_name(path)
    name, root = args.data or rec_name or "fashion-mnist", args.data_root or rec_root
    split = getattr(args, "val_split", None)
    train, val, test = split_and_subset(kp.data.load(name, **({"root": root} if root else {})), split,
                                        args.train_subset, args.val_subset, seed)
    return {"data": name, "data_root": root, **({"val_split": split} if split else {})}, train, val, test


def split_and_subset(data: tuple[Any, Any], val_split: int | None, train_subset: int | None,
                     val_subset: int | None, seed: int) -> tuple[Any, Any, Any]:
    """(train, val, test) from a set's (train, test): with ``val_split`` the validation set is that
    many training images, always the same ones (``kdprune.data.SPLIT_SEED``), and the test split
    comes back apart (None otherwise: val is the set's own split); then the seeded subsets."""
    from kdprune.data import SPLIT_SEED

    train, val = data
    test = None
    if val_split:
        train, held = train.split(val_split, seed=SPLIT_SEED)
        val, test = held, val
    if train_subset:
        train = train.subset(train_subset, seed=seed)
    if val_subset:
        val = val.subset(val_subset, seed=seed)
    return train, val, test


RUN_MARKER = "kdprune-run.json"


def run_kind(path: Path) -> str | None:
    """What kind of kdprune run `path` holds: "train", "compress", "other" (files that are not
    a kdprune run), or None (missing or empty)."""
    if not path.is_dir() or {p.name for p in path.iterdir()} <= {RUN_MARKER}:
        return None  # empty, or only the marker of a run that failed before it wrote anything
    marker = path / RUN_MARKER
    if marker.is_file():
        return json.loads(marker.read_text()).get("kind", "other")
    cfg_file = path / "config.json"  # runs written before the marker existed
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if (path / "report.json").is_file() or "recipe" in cfg:
        return "compress"
    return "train" if "train_config" in cfg else "other"


def _check_not_source(out: Path, source: Path | None) -> None:
    if source is None:
        return
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise ValueError(f"--out {out} would overwrite the --from model {source}; choose another --out")


def prepare_out(out: Path, kind: str, resume: bool, overwrite: bool, source: Path | None = None) -> None:
    """Refuse to write over another run unless asked; mark `out` as a `kind` run (rank 0 only)."""
    import shutil

    from kdprune.utils.dist import is_main_process

    _check_not_source(out, source)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if not is_main_process():
        return
    found = run_kind(out)
    if resume and found not in (None, kind):
        raise ValueError(f"--out {out} holds a {found} run, not a {kind} run: nothing to --resume there")
    if found is not None and not resume:
        if not overwrite:
            raise ValueError(f"--out {out} already holds a {found} run; pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")
        if found == "other":
            raise ValueError(f"--out {out} holds files that are not a kdprune run; --overwrite only "
                             f"replaces kdprune runs: remove them yourself or choose another --out")
        shutil.rmtree(out)
    from kdprune.utils.meta import write_json

    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).is_file():
        write_json(out / RUN_MARKER, {"kind": kind})
