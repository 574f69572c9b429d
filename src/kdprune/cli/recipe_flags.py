"""`kdprune compress` flags generated from the recipe dataclasses, so that a new method registers
its recipe under its CLI name (``@register_recipe`` in its own module) and nothing else: every
scalar or choice field becomes a flag (``--mode global``), every training stage (a TrainConfig
field) gets ``--<stage>-epochs`` / ``--<stage>-lr``, and the help shows each method's real
defaults."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import types
import typing
from typing import Any

from kdprune.cli.field_docs import field_docs
from kdprune.registry import choice_name, choices_of
from kdprune.training.config import TrainConfig

# Fields that are no flag: the format version, and the main stage (the training flags set it).
_SKIP = {"version", "finetune"}
# Training flags that reach every stage of a recipe; the other training flags set `finetune`.
RUN_WIDE = ("max_steps_per_epoch", "progress", "seed", "device", "threads", "bf16", "channels_last",
            "compile", "eval_batch_size", "weight_decay_1d")


def methods() -> dict[str, type]:
    """CLI method names -> recipe types, as the method modules registered them."""
    import kdprune.methods
    from kdprune.methods.registry import RECIPES

    for mod in pkgutil.iter_modules(kdprune.methods.__path__):  # each registers its own recipes
        importlib.import_module(f"kdprune.methods.{mod.name}")
    return {name: RECIPES.get(name) for name in RECIPES}


def name_count(text: str) -> tuple[str, int]:
    """A ``NAME=N`` flag value (a layer name or glob and a count), e.g. ``stem.*=8``."""
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=N (a layer name or glob, a count), got {text!r}")
    return name, int(count)


name_count.__name__ = "name=n"  # the metavar the help shows


def _scalar_type(tp: Any) -> tuple[Any, bool] | None:
    """(element type, is a list) of a flag-able field type, else None; a choice field (a union
    of tagged types, an Enum) is its own element type; (name, count) pairs take NAME=N."""
    if tp == tuple[tuple[str, int], ...]:
        return name_count, True
    if choices_of(tp):
        return tp, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else None
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        listed = len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str)
        return (args[0], True) if listed else None
    return (tp, False) if tp in (bool, int, float, str) else None


def recipe_fields(cls: type) -> tuple[dict[str, tuple[type, bool]], list[str]]:
    """(scalar fields -> (type, is list), stage names) of one recipe type."""
    hints = typing.get_type_hints(cls)
    scalars, stages = {}, []
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        if hints[f.name] is TrainConfig:
            stages.append(f.name)
        elif (st := _scalar_type(hints[f.name])) is not None:
            scalars[f.name] = st
    return scalars, stages


def _bool(text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return low in ("true", "1", "yes")


def _stage_line(rec: Any, stage: str) -> str:
    cfg: TrainConfig = getattr(rec, stage)
    if getattr(rec, f"{stage}_epochs", None) == 0:
        return f"off ({stage}_epochs=0)"
    opt, sch = cfg.optimizer, cfg.schedule
    return f"{cfg.epochs} ep {type(opt).__name__} lr {opt.lr:g} wd {opt.weight_decay:g} {type(sch).__name__}"


def defaults_epilog() -> str:
    """Every method's stages with their real default schedules (for --help)."""
    wide = ["--no-progress" if k == "progress" else "--" + k.replace("_", "-") for k in RUN_WIDE]
    lines = ["training stages and their defaults (the training flags set `finetune`;",
             f"  {', '.join(wide)} reach every stage):"]
    for name, cls in methods().items():
        rec = cls()
        stages = ["finetune"] + recipe_fields(cls)[1]
        lines.append(f"  {name:<10} " + "; ".join(f"{s}: {_stage_line(rec, s)}" for s in stages))
    return "\n".join(lines)


def _train_dests() -> set[str]:
    """Dests of the training flags: a recipe field of the same name (KESI.max_lr) is left to them."""
    from kdprune.cli.common import add_train_args

    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p)
    return {a.dest for a in p._actions}


def _flag_specs() -> dict[str, dict[str, Any]]:
    """dest -> {type, list, methods: {method: default}} over every method's scalar and stage fields."""
    specs: dict[str, dict[str, Any]] = {}
    taken = _train_dests()
    for name, cls in methods().items():
        scalars, stages = recipe_fields(cls)
        scalars = {k: v for k, v in scalars.items() if k not in taken}
        rec = cls()
        docs = field_docs(cls)
        for field_name, (tp, is_list) in scalars.items():
            spec = specs.setdefault(field_name, {"type": tp, "list": is_list, "methods": {}, "choices": set()})
            spec["methods"][name] = getattr(rec, field_name)
            spec["doc"] = spec.get("doc") or docs.get(field_name, "")  # the first method that comments it
            spec["choices"] |= set(choices_of(tp))
        for stage in stages:
            for key, tp in ((f"{stage}_epochs", int), (f"{stage}_lr", float)):
                if key not in scalars:
                    spec = specs.setdefault(key, {"type": tp, "list": False, "methods": {}, "choices": set(),
                                                  "doc": f"{key.rpartition('_')[2]} of the {stage} stage"})
                    cfg = getattr(rec, stage)
                    spec["methods"][name] = cfg.epochs if key.endswith("epochs") else cfg.optimizer.lr
    return specs


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """One flag per recipe field (help: which methods take it, with their defaults)."""
    g = p.add_argument_group("method options (generated from the recipes; default per method)")
    for dest, spec in sorted(_flag_specs().items()):
        where = spec.get("doc", "") + " (" + ", ".join(f"{m}={_shown(v)}" for m, v in spec["methods"].items()) + ")"
        where = where.strip().replace("%", "%%")  # argparse formats help with %
        flag = "--" + dest.replace("_", "-")
        if spec["choices"]:  # a typed choice by its name; from_dict maps the name to the type
            g.add_argument(flag, dest=dest, type=str.lower, choices=sorted(spec["choices"]), help=where)
            continue
        tp = _bool if spec["type"] is bool else spec["type"]
        g.add_argument(flag, dest=dest, type=tp, nargs="+" if spec["list"] else None,
                       metavar=spec["type"].__name__.upper(), help=where)


def _shown(value: Any) -> str:
    """A default as the help shows it: choices by their name."""
    return "unset" if value is None else (choice_name(value) or str(value))


def recipe_flag_dests() -> list[str]:
    """Every dest add_recipe_args declares."""
    return sorted(_flag_specs())


def apply_recipe_flags(cls: type, name: str, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Put the recipe flags the user gave into the recipe's tagged dict; refuse ones it lacks."""
    scalars, stages = recipe_fields(cls)
    out = dict(data)
    for dest in recipe_flag_dests():  # (training-flag names never reach here: see _train_dests)
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if dest in scalars:
            out[dest] = list(value) if isinstance(value, list) else value
            continue
        stage, _, key = dest.rpartition("_")
        if stage not in stages:
            raise ValueError(f"{flag} does not apply to method {name!r}")
        cfg = dict(out[stage])
        if key == "epochs":
            cfg["epochs"] = value
        else:
            cfg["optimizer"] = {**cfg["optimizer"], "lr": value}
        out[stage] = cfg
    return out
