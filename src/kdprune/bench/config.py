"""`kdprune bench` configs: frozen dataclasses filled from YAML. Method names map to recipe types
through the recipe registry here, at the boundary; a method's partial recipe is merged field by
field over the recipe's own defaults (after the budget's epochs/lr), as `kdprune compress --config`
merges its YAML."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdprune.engine import Target
from kdprune.models.pretrained import PREFIX
from kdprune.training import TrainConfig
from kdprune.training.config_io import from_dict, load_yaml, merge_tagged, to_tagged_dict

__all__ = ["DataSpec", "Budget", "EqualWall", "EqualCompute", "LatencySpec", "BenchMethod", "BenchConfig", "CONTROL",
           "load_config", "config_from_dict", "build_recipe", "configure", "configure_stage", "stage_names",
           "target_label"]

#: The --only name of the dense + same-epochs control (no method may use it as its label).
CONTROL = "control"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # labels name run folders: no slashes or spaces


@dataclass(frozen=True)
class DataSpec:
    """The images every run trains on: ``val_split`` training images held out first for the
    choices a method makes (``kdprune.data.SPLIT_SEED``: the images a base trained with
    ``--val-split`` never saw), then ``train_images`` drawn stratified from the rest
    (``ImageDataset.split(n, seed)[1]``; all of it when None); the test set is only reported."""

    name: str = "fashion-mnist"
    root: str | None = None
    train_images: int | None = None
    val_split: int | None = None
    seed: int = 0  # draws the subsets: the same images for every method and seed


@dataclass(frozen=True)
class Budget:
    """Equal-epoch budget: ``epochs`` is every method's total and the dense control's epochs;
    ``epochs``/``lr`` are the default fine-tune stage of each recipe (a method's own recipe
    overrides them); the rest reaches every training stage of every run."""

    epochs: int = 3
    lr: float | None = None  # None: each recipe's own fine-tune lr (the control: SGD 0.01)
    threads: int | None = None
    batch_size: int | None = None
    max_steps_per_epoch: int | None = None  # smoke runs only
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"budget.epochs must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class EqualWall:
    """Equal wall time: each of ``methods`` (labels) also runs with as many fine-tune epochs as
    fit in ``reference``'s measured wall time at the same target and seed (at ``targets`` only,
    when given: a slow reference makes these runs the costliest of a grid)."""

    reference: str
    methods: tuple[str, ...]
    targets: tuple[Target, ...] | None = None


@dataclass(frozen=True)
class EqualCompute:
    """Equal training compute (issue 36): each of ``methods`` also runs with as many fine-tune epochs
    as fit in ``reference``'s counted training FLOPs (``train_flops``: every forward and backward it
    ran) at the same target and seed, from its own counted FLOPs per epoch; never fewer epochs."""

    reference: str
    methods: tuple[str, ...]
    targets: tuple[Target, ...] | None = None


@dataclass(frozen=True)
class LatencySpec:
    """Report-time CPU latency: interleaved rounds at these batch sizes."""

    batch_sizes: tuple[int, ...] = (1, 64)
    rounds: int = 15
    threads: int | None = None  # None: the budget's threads


@dataclass(frozen=True)
class BenchMethod:
    """One row family: a label, its recipe (no target or seed yet) and optional own targets
    (a block-pruning method cannot land on every channel-pruning target)."""

    label: str
    recipe: Any
    targets: tuple[Target, ...] | None = None


@dataclass(frozen=True)
class BenchConfig:
    """A grid: methods x targets x seeds from one base, results appended to a JSONL."""

    name: str
    base: str  # a run directory, saved model folder, or pretrained:NAME
    data: DataSpec
    seeds: tuple[int, ...]
    targets: tuple[Target, ...]
    methods: tuple[BenchMethod, ...]
    results: Path
    runs: Path
    budget: Budget = field(default_factory=Budget)
    equal_wall: EqualWall | None = None
    equal_compute: tuple[EqualCompute, ...] = ()  # one per reference method
    latency: LatencySpec = field(default_factory=LatencySpec)
    machine: str | None = None  # recorded in every line; None: described from this machine
    progress: bool = False

    def method(self, label: str) -> BenchMethod:
        """The method with this label (KeyError naming the labels)."""
        for m in self.methods:
            if m.label == label:
                return m
        raise KeyError(f"no method labelled {label!r}; labels: {', '.join(m.label for m in self.methods)}")

    def targets_of(self, method: BenchMethod) -> tuple[Target, ...]:
        """The method's own targets, else the grid's."""
        return method.targets if method.targets is not None else self.targets

    def with_threads(self, threads: int) -> "BenchConfig":
        """The same grid on ``threads`` torch threads (the CLI's --threads)."""
        return replace(self, budget=replace(self.budget, threads=threads))


def target_label(target: Target) -> str:
    """``flops0.5`` / ``params0.25``: a target as run tags and tables show it."""
    return f"{target.metric}{target.value:g}"


def stage_names(recipe: Any) -> list[str]:
    """The recipe's training stages: its TrainConfig fields."""
    hints = typing.get_type_hints(type(recipe))
    return [f.name for f in dataclasses.fields(recipe) if hints[f.name] is TrainConfig]


def _recipe_types() -> dict[str, type]:
    import kdprune.methods  # noqa: F401  (its modules register every shipped recipe)
    from kdprune.methods.registry import RECIPES

    return {name: RECIPES.get(name) for name in RECIPES}


def build_recipe(method: str, partial: dict[str, Any], budget: Budget, where: str) -> Any:
    """Recipe ``method`` (a CLI method name): its defaults, then the budget's fine-tune epochs/lr,
    then ``partial`` merged field by field (kdprune.training.config_io.merge_tagged)."""
    types = _recipe_types()
    if method not in types:
        raise ValueError(f"{where}: unknown method {method!r}; known: {', '.join(sorted(types))}")
    cls = types[method]
    data = to_tagged_dict(cls())
    if "finetune" in stage_names(cls()):
        opt = {} if budget.lr is None else {"optimizer": {"lr": budget.lr}}
        data = merge_tagged(data, {"finetune": {"epochs": budget.epochs, **opt}})
    if not isinstance(partial, dict):
        raise ValueError(f"{where}.recipe: expected a mapping of {cls.__name__} fields, got {partial!r}")
    return from_dict(cls, merge_tagged(data, partial), where=f"{where}.recipe")


def configure_stage(cfg: TrainConfig, seed: int, budget: Budget, progress: bool = False) -> TrainConfig:
    """One training stage with the run's seed and the budget's run-wide settings."""
    wide = {k: getattr(budget, k) for k in ("threads", "batch_size", "max_steps_per_epoch", "device")
            if getattr(budget, k) is not None}
    return replace(cfg, seed=seed, progress=progress, **wide)


def configure(recipe: Any, target: Target, seed: int, budget: Budget, progress: bool = False) -> Any:
    """The recipe of one run: the target set, and the seed and budget's run-wide settings in
    every training stage."""
    names = {f.name for f in dataclasses.fields(recipe)}
    fields = {"target_flops": target.flops, "target_params": target.params}
    if "target_latency" in names:  # recipes that take a latency target also say where it is measured
        fields.update(target_latency=target.latency, latency_batch=target.latency_batch,
                      latency_backend=target.latency_backend)
    if not set(fields) <= names or (target.latency is not None and "target_latency" not in names):
        raise ValueError(f"{type(recipe).__name__} takes no {target.metric} target")
    stages = {s: configure_stage(getattr(recipe, s), seed, budget, progress) for s in stage_names(recipe)}
    return replace(recipe, **fields, **stages)


def _targets(items: Any, where: str) -> tuple[Target, ...]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a non-empty list like [{{flops: 0.5}}, {{params: 0.25}}]")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise ValueError(f"{where}[{i}]: a target is a mapping {{flops: F}}, {{params: F}} or {{latency: F}}, "
                             f"got {t!r}")
        out.append(from_dict(Target, t, f"{where}[{i}]"))
    return tuple(out)


def _equal_wall(d: Any, where: str, kind: type = EqualWall) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected {{reference: LABEL, methods: [LABEL...], targets: [...]}}, got {d!r}")
    ew = from_dict(kind, {k: v for k, v in d.items() if k != "targets"}, where)
    return replace(ew, targets=_targets(d["targets"], f"{where}.targets")) if "targets" in d else ew


def _equal_compute(d: Any, where: str) -> tuple[EqualCompute, ...]:
    items = d if isinstance(d, list) else [d]
    return tuple(_equal_wall(x, f"{where}[{i}]", EqualCompute) for i, x in enumerate(items))


_METHOD_KEYS = {"label", "method", "recipe", "targets"}


def _method(d: Any, budget: Budget, where: str) -> BenchMethod:
    if not isinstance(d, dict) or "method" not in d:
        raise ValueError(f"{where}: expected {{label: NAME, method: METHOD, recipe: {{...}}}}, got {d!r}")
    unknown = set(d) - _METHOD_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_METHOD_KEYS)}")
    label = str(d.get("label", d["method"]))
    if not _LABEL.match(label) or label == CONTROL:
        raise ValueError(f"{where}: label {label!r} must be letters, digits, '.', '_', '+', '-' (not {CONTROL!r})")
    recipe = build_recipe(d["method"], d.get("recipe") or {}, budget, where)
    targets = _targets(d["targets"], f"{where}.targets") if "targets" in d else None
    return BenchMethod(label, recipe, targets)


def _check(cfg: BenchConfig, where: str) -> None:
    labels = [m.label for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: method labels must be unique, got {labels}")
    if not cfg.seeds:
        raise ValueError(f"{where}: seeds must list at least one seed")
    for m in cfg.methods:
        for t in cfg.targets_of(m):
            configure(m.recipe, t, cfg.seeds[0], cfg.budget).target()  # each run's recipe validates
    matched = [(f"{where}.equal_wall", cfg.equal_wall)] if cfg.equal_wall is not None else []
    matched += [(f"{where}.equal_compute[{i}]", ec) for i, ec in enumerate(cfg.equal_compute)]
    for at, ew in matched:
        _check_matched(cfg, ew, labels, at)


def _check_matched(cfg: BenchConfig, ew: EqualWall | EqualCompute, labels: list[str], where: str) -> None:
    """An equal-wall or equal-compute block names real methods, their targets, and methods that can be
    given more fine-tune epochs."""
    unknown = [lb for lb in (ew.reference, *ew.methods) if lb not in labels]
    if unknown:
        raise ValueError(f"{where}: no method labelled {unknown[0]!r}; labels: {', '.join(labels)}")
    missing = [t for t in ew.targets or () if not any(t in cfg.targets_of(cfg.method(lb)) for lb in ew.methods)]
    if missing:
        raise ValueError(f"{where}.targets: {missing[0]} is not a target of {list(ew.methods)}")
    bad = [lb for lb in ew.methods if lb == ew.reference or "finetune" not in stage_names(cfg.method(lb).recipe)]
    if bad:
        raise ValueError(f"{where}: {bad} cannot be given more fine-tune epochs "
                         f"(the reference itself, or no finetune stage)")


@dataclass(frozen=True)
class _Seeds:
    seeds: tuple[int, ...]


_KEYS = {"name", "base", "data", "seeds", "targets", "methods", "budget", "equal_wall", "equal_compute", "latency",
         "results", "runs", "machine", "progress"}


def config_from_dict(d: dict[str, Any], root: str | Path = ".", where: str = "bench config") -> BenchConfig:
    """A BenchConfig from plain data; relative paths (base, results, runs) are under ``root``."""
    unknown = set(d) - _KEYS
    missing = {"base", "methods", "targets", "results", "runs"} - set(d)
    if unknown or missing:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}; "
                         f"valid: {sorted(_KEYS)}")
    budget = from_dict(Budget, d.get("budget") or {}, f"{where}.budget")
    methods = d["methods"]
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{where}.methods: expected a non-empty list")
    root = Path(root)
    base = str(d["base"])
    cfg = BenchConfig(
        name=str(d.get("name", "bench")), base=base if base.startswith(PREFIX) else str(root / base),
        data=from_dict(DataSpec, d.get("data") or {}, f"{where}.data"),
        seeds=from_dict(_Seeds, {"seeds": d.get("seeds", [0])}, where).seeds,
        targets=_targets(d["targets"], f"{where}.targets"),
        methods=tuple(_method(m, budget, f"{where}.methods[{i}]") for i, m in enumerate(methods)),
        results=root / d["results"], runs=root / d["runs"], budget=budget,
        equal_wall=_equal_wall(d["equal_wall"], f"{where}.equal_wall") if d.get("equal_wall") else None,
        equal_compute=_equal_compute(d["equal_compute"], f"{where}.equal_compute") if d.get("equal_compute") else (),
        latency=from_dict(LatencySpec, d.get("latency") or {}, f"{where}.latency"),
        machine=d.get("machine"), progress=bool(d.get("progress", False)))
    _check(cfg, where)
    return cfg


def load_config(path: str | Path) -> BenchConfig:
    """Read a bench YAML; its relative paths are relative to the YAML file's folder."""
    path = Path(path)
    return config_from_dict(load_yaml(path), root=path.parent, where=str(path))
