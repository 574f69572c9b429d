"""Every channel-pruning recipe at a tiny budget on TinyNet(width=32), for the tests of options that all
of them take (ignored_layers, layer_min_width)."""
from __future__ import annotations

import kdprune as kp

FT = kp.TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2, progress=False)
CHANNEL_RECIPES = [
    kp.recipes.L1Finetune(target_flops=0.6, finetune=FT),
    kp.recipes.KDFinetune(target_flops=0.6, finetune=FT),
    kp.recipes.GroupNorm(target_flops=0.6, sparse=FT, finetune=FT),
    kp.recipes.SDAP(target_flops=0.6, ramp_epochs=1, finetune=kp.TrainConfig(epochs=2, batch_size=32, progress=False)),
    kp.recipes.KESI(target_flops=0.6, rounds=1, retrain_epochs=1, distill_epochs=1, finetune=FT),
    kp.recipes.EDP(target_flops=0.85, sparse=FT, finetune=FT),
    kp.recipes.Cascade(target_flops=0.6, assistants=0, cascade=FT, finetune=FT),
    kp.recipes.TPMagnitude(target_flops=0.6, finetune=FT),
]
