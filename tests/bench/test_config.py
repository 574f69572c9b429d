"""Bench configs: YAML -> typed dataclasses, partial recipes merged over the recipe defaults after
the budget, clear errors, the shipped profiles valid."""
from pathlib import Path

import pytest

import kdprune as kp
from kdprune.bench import Budget, build_recipe, config_from_dict, configure, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"base": "pretrained:resnet20-fmnist", "targets": [{"flops": 0.5}], "results": "r.jsonl", "runs": "runs"}


def _cfg(methods, **over):
    return config_from_dict({**BASE, "methods": methods, **over}, root="/x")


def test_shipped_profiles_parse():
    quick = load_config(ROOT / "benchmarks" / "quick.yaml")
    assert [m.label for m in quick.methods] == ["l1", "kd", "groupnorm", "tp-magnitude", "tp-groupnorm", "sdap",
                                                "kesi", "oed", "cascade", "edp"]
    assert quick.seeds == (0, 1, 2) and [t.flops for t in quick.targets] == [0.5, 0.25]
    assert quick.results == ROOT / "benchmarks" / "results" / "bench_quick.jsonl"  # relative to the YAML
    assert quick.equal_wall.reference == "cascade" and quick.data.train_images == 20000
    gn = quick.method("groupnorm").recipe
    assert (gn.sparse.epochs, gn.finetune.epochs, gn.sparse.optimizer.lr) == (1, 2, 0.01)
    assert quick.method("l1").recipe.finetune.epochs == 3 and quick.method("oed").targets[0].flops == 0.53
    assert quick.method("kesi").recipe.retrain_config().optimizer.lr == 0.1  # its own max_lr beats the budget lr
    full = load_config(ROOT / "benchmarks" / "full.yaml")
    assert full.data.name == "cifar10" and full.budget.epochs == 30


def test_kd_pays_profile_gives_every_run_six_epochs():
    cfg = load_config(ROOT / "benchmarks" / "kd_pays.yaml")
    assert cfg.base == "pretrained:resnet20b-fmnist" and cfg.data.val_split == 5000
    for m in cfg.methods:
        r = m.recipe
        if isinstance(r, kp.recipes.KESI):  # rounds x retrain epochs + distillation epochs
            dist = r.distill_config()
            total = r.rounds * r.retrain_config().epochs + (dist.epochs if dist else 0)
        else:
            total = r.finetune.epochs
        assert total == 6, m.label
    assert not cfg.method("kesi-single").recipe.include_snapshots
    assert cfg.method("pfec").recipe.retrain_config().optimizer.lr == 1e-3  # PFEC's constant small lr
    assert isinstance(cfg.method("sdap-uniform").recipe.mode, kp.engine.Uniform)
    assert cfg.method("sdap").recipe.remove_early and not cfg.method("sdap-gated").recipe.remove_early


def test_partial_recipe_merges_over_budget_over_defaults():
    budget = Budget(epochs=4, lr=0.02)
    r = build_recipe("kd", {"temperature": 2.0, "finetune": {"schedule": "step"}}, budget, "t")
    assert isinstance(r, kp.recipes.KDFinetune) and r.temperature == 2.0 and r.alpha == 0.9
    assert (r.finetune.epochs, r.finetune.optimizer.lr, type(r.finetune.schedule)) == (4, 0.02, kp.Step)
    own = build_recipe("l1", {"finetune": {"optimizer": {"lr": 0.5}}, "mode": "global"}, budget, "t")
    assert own.finetune.optimizer.lr == 0.5 and isinstance(own.mode, kp.engine.Global)
    assert build_recipe("l1", {}, Budget(epochs=2), "t").finetune.optimizer.lr == 0.01  # the recipe's own


def test_configure_sets_target_seed_and_run_wide_budget():
    budget = Budget(epochs=1, threads=3, batch_size=16, max_steps_per_epoch=2)
    r = configure(build_recipe("groupnorm", {}, budget, "t"), kp.Target(params=0.3), 7, budget)
    assert (r.target_flops, r.target_params) == (None, 0.3)
    for stage in (r.sparse, r.finetune):
        assert (stage.seed, stage.threads, stage.batch_size, stage.max_steps_per_epoch) == (7, 3, 16, 2)


@pytest.mark.parametrize("methods, over, match", [
    ([{"label": "a", "method": "l11"}], {}, "unknown method 'l11'"),
    ([{"label": "a", "method": "l1", "recipe": {"nope": 1}}], {}, r"unknown option\(s\) \['nope'\]"),
    ([{"label": "a", "method": "l1", "typo": 1}], {}, "unknown key"),
    ([{"label": "a b", "method": "l1"}], {}, "label 'a b'"),
    ([{"label": "control", "method": "l1"}], {}, "label 'control'"),
    ([{"label": "a", "method": "l1"}, {"label": "a", "method": "kd"}], {}, "unique"),
    ([{"label": "a", "method": "l1"}], {"equal_wall": {"reference": "b", "methods": ["a"]}}, "no method labelled 'b'"),
    ([{"label": "a", "method": "l1"}], {"targets": [{"flops": 1.5}]}, "fraction to keep"),
    ([{"label": "a", "method": "l1"}], {"targets": [0.5]}, "a target is a mapping"),
    ([{"label": "a", "method": "l1"}], {"seeds": ["x"]}, "expected an integer"),
    ([{"label": "a", "method": "kesi", "recipe": {"stage_ratios": [0.5]}}], {}, "stage_ratios"),
    ([{"label": "a", "method": "l1"}], {"budget": {"epoch": 3}}, "unknown option"),
    ([{"label": "a", "method": "l1"}], {"result": "x"}, "unknown key"),
])
def test_errors_name_the_problem(methods, over, match):
    with pytest.raises(ValueError, match=match):
        _cfg(methods, **over)
