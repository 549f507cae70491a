"""roi_human: per-person masks (background / this person / other people) from an RoIAlign head.

Real data: COCO 2017 person annotations (--train_ann --val_ann --train_img_dir --val_img_dir),
640×640 inputs, the full-size head on C=1024 stride-8 features. Without data paths the demo
overrides below apply: a small COCO-format demo dataset, 128 px inputs and a small model, so the
whole run takes a few minutes on 2 CPU cores.
"""
from segjax.config import Config, OptimConfig, TrainConfig
from segjax.tasks.roi_instance import RoiDataConfig, RoiLossConfig, RoiModelConfig


def get_config() -> Config:
    return Config(
        experiment="roi_human",
        task="roi_instance",
        data=RoiDataConfig(),
        model=RoiModelConfig(),
        loss=RoiLossConfig(ce_weight=1.0, dice_weight=1.0),
        optim=OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4, scheduler="cosine", min_lr=1e-6),
        train=TrainConfig(epochs=30, batch_size=16, num_workers=4),
    )


# Applied (before command-line overrides) when no data paths are given.
DEMO_OVERRIDES = {
    "data.image_size": "128",
    "data.max_rois": "4",
    "model.feature_channels": "64",
    "model.backbone_widths": "16,32,64",
    "model.backbone_blocks": "1,1,1",
    "model.head_width": "32",
    "model.head_fine_width": "16",
    "optim.lr": "3e-3",
    "optim.min_lr": "1e-4",
    "train.epochs": "20",
    "train.batch_size": "8",
    "train.num_workers": "0",
    "train.eval_at_start": "true",
}
