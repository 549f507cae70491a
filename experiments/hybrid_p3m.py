"""hybrid_p3m: portrait masks from DarkNet-53 + FPN + a query decoder (set-prediction loss).

Real data: `--data_dir` holding the memmaps of tools/prepare_p3m.py (P3M-10k + Supervisely Person,
640×640), or explicit files with `--set data.train_images=...` etc. (the original PyTorch
pipeline's float16 files are read too). Without data the demo variant applies: synthetic
P3M/Supervisely folders prepared into 128 px memmaps and the tiny model, a few minutes on 2 CPU
cores. Modes: `--mode overfit` trains 100 steps on one image and mask (the loss should fall near
zero), `--mode train` (the default) trains.
"""
from typing import Literal

from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.tasks.query_masks import QueryMaskDataConfig, QueryMaskLossConfig, QueryMaskModelConfig


def get_config(mode: Literal["train", "overfit"] = "train", demo: bool = False) -> Config:
    cfg = Config(
        experiment="hybrid_p3m",
        task="query_masks",
        data=QueryMaskDataConfig(),  # 640 px memmaps; the size is read from the prepared files
        model=QueryMaskModelConfig(size="full"),
        loss=QueryMaskLossConfig(),
        optim=OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4),
        train=TrainConfig(epochs=50, batch_size=20, num_workers=4),
    )
    if demo:  # training on the demo portraits (no data given)
        cfg = updated(cfg, data=dict(image_size=128), model=dict(size="tiny"), optim=dict(lr=2e-3),
                      train=dict(epochs=40, batch_size=8, num_workers=0, eval_at_start=True))
    if mode == "overfit":
        # One record, batch 1, constant lr: 100 epochs of one step each; checkpointed once, at the end.
        cfg = updated(cfg, data=dict(overfit_one=True), optim=dict(scheduler="none"),
                      train=dict(batch_size=1, epochs=100, validate_every=25, save_every=100, eval_at_start=True))
    return cfg
