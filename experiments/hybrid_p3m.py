"""hybrid_p3m: portrait masks from DarkNet-53 + FPN + a query decoder (set-prediction loss).

Real data: `--data_dir` holding the memmaps of tools/prepare_p3m.py (P3M-10k + Supervisely Person,
640×640), or explicit files with `--set data.train_images=...` etc. (the original PyTorch
pipeline's float16 files are read too). Without data the demo overrides below apply: synthetic
P3M/Supervisely folders prepared into 128 px memmaps and the tiny model, a few minutes on 2 CPU
cores. Modes: `--mode overfit` trains 100 steps on one image and mask (the loss should fall near
zero), `--mode train` (the default) trains.
"""
from segjax.config import Config, OptimConfig, TrainConfig
from segjax.tasks.query_masks import QueryMaskDataConfig, QueryMaskLossConfig, QueryMaskModelConfig


def get_config() -> Config:
    return Config(
        experiment="hybrid_p3m",
        task="query_masks",
        data=QueryMaskDataConfig(image_size=640),
        model=QueryMaskModelConfig(size="full"),
        loss=QueryMaskLossConfig(),
        optim=OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4),
        train=TrainConfig(epochs=50, batch_size=20, num_workers=4),
    )


MODES = {
    # One record, batch 1, constant lr: 100 epochs of one step each; checkpointed once, at the end.
    "overfit": {"data.overfit_one": "true", "train.batch_size": "1", "train.epochs": "100", "optim.scheduler": "none",
                "train.validate_every": "25", "train.save_every": "100", "train.eval_at_start": "true"},
    "train": {},
}

# Applied (before --mode and command-line overrides) when no data is given.
DEMO_OVERRIDES = {
    "data.image_size": "128",
    "model.size": "tiny",
    "optim.lr": "2e-3",
    "train.epochs": "40",
    "train.batch_size": "8",
    "train.num_workers": "0",
    "train.eval_at_start": "true",
}
