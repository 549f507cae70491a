"""roi_human: per-person masks (background / this person / other people) from an RoIAlign head.

Real data: COCO 2017 person annotations (--train_ann --val_ann --train_img_dir --val_img_dir),
640×640 inputs, the full-size head on C=1024 stride-8 features. Without data paths the demo
variant applies: a small COCO-format demo dataset, 128 px inputs and a small model, so the whole
run takes a few minutes on 2 CPU cores.
"""
from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.tasks.roi_instance import RoiDataConfig, RoiLossConfig, RoiModelConfig


def get_config(demo: bool = False) -> Config:
    cfg = Config(
        experiment="roi_human",
        task="roi_instance",
        data=RoiDataConfig(),
        model=RoiModelConfig(),
        loss=RoiLossConfig(ce_weight=1.0, dice_weight=1.0),
        optim=OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4, scheduler="cosine", min_lr=1e-6),
        train=TrainConfig(epochs=30, batch_size=16, num_workers=4),
    )
    if demo:  # training on the demo data (no data paths given)
        cfg = updated(cfg, data=dict(image_size=128, max_rois=4), model=dict(size="tiny"),
                      optim=dict(lr=3e-3, min_lr=1e-4),
                      train=dict(epochs=20, batch_size=8, num_workers=0, eval_at_start=True))
    return cfg
